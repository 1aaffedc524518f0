"""A Debian 12 userland with systemd as PID 1 in systemd-nspawn, for testing the unit for real.

The host's PID 1 is not systemd (a CI runner, a microVM): ``machinectl`` and
``systemd-run --machine`` do not work, so commands enter the container's namespaces with
``nsenter`` (the recipe of ../shared/tools/systemd-container.sh, with its measured limits:
``IPAddressDeny=`` is not enforced; ``MemoryMax=``/``TasksMax=``/``CPUQuota=`` are ignored
because nspawn mounts the cgroup v1 controllers read-only; ``LimitNOFILE`` is capped at the
host's hard limit).

- :class:`Rootfs`: ``debootstrap --variant=minbase`` with systemd, tor, python3-venv,
  wireguard-tools and iproute2, built once per machine into a cache folder keyed by the recipe
  (``RB_NSPAWN_CACHE``, default ``/var/cache/rustbalance-tests``), under a file lock, into a
  temporary folder renamed when complete. A clean CI machine builds it (about a minute).
- :func:`wheelhouse`: the project's pinned runtime and build dependencies as wheels (host
  pip, cached the same way), so ``pip install`` inside the container needs no index.
- :class:`Container`: an overlay on the cached rootfs (the rootfs itself never changes; the
  upper layer lives in the test's folder), booted with the host's network namespace (the
  private Tor network listens on the host's 127.0.0.1), in cgroups of its own that are removed
  afterwards. Every process started is tracked and stopped by PID.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SUITE = "bookworm"
# What the unit and deploy.sh need at run time; deploy.sh's own apt-get step then finds them
# installed and needs no network. procps: ps/pidof for debugging inside.
PACKAGES = (
    "systemd",
    "systemd-sysv",
    "dbus",
    "procps",
    "tor",
    "python3",
    "python3-venv",
    "wireguard-tools",
    "iproute2",
)
# Bump when the build steps change: the cache key includes it.
RECIPE_VERSION = "1"
# Units of the rootfs that must not run in a test: tor.service would start a tor on the real
# network (deploy.sh starts tor@default itself where a node needs it); the apt timers would
# reach the mirror at random times.
DISABLED_UNITS = ("tor.service",)
MASKED_UNITS = ("apt-daily.timer", "apt-daily-upgrade.timer", "e2scrub_all.timer")
DEBOOTSTRAP_TIMEOUT = 900.0
PIP_TIMEOUT = 600.0
BOOT_TIMEOUT = 60.0
POWEROFF_TIMEOUT = 20.0
_ENV_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class ContainerError(Exception):
    """The container could not be built, booted or entered; the message says why."""


def cache_root() -> Path:
    return Path(os.environ.get("RB_NSPAWN_CACHE", "/var/cache/rustbalance-tests"))


def why_not_runnable() -> str | None:
    """None when this machine can run the container test, else the reason (for the failure)."""
    if os.geteuid() != 0:
        return "systemd-nspawn needs root: run `make test` (or pytest) as root, as CI does"
    missing = [
        tool for tool in ("systemd-nspawn", "debootstrap", "nsenter") if not shutil.which(tool)
    ]
    if missing:
        return (
            f"{', '.join(missing)} missing: `make deps` installs the Debian packages "
            "systemd-container and debootstrap"
        )
    if not Path("/sys/fs/cgroup").is_dir():
        return "no /sys/fs/cgroup: systemd cannot run in a container here"
    return None


def debian_mirror() -> str:
    """The host's Debian mirror (deb822 sources), else deb.debian.org."""
    sources = Path("/etc/apt/sources.list.d/debian.sources")
    with contextlib.suppress(OSError):
        for line in sources.read_text().splitlines():
            if line.startswith("URIs:"):
                return line.split()[1]
    return "http://deb.debian.org/debian"


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _run(argv: Sequence[str], *, timeout: float, log: Path | None = None) -> None:
    """Run a host command; on failure raise with the tail of its output."""
    out = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, check=False)
    if log is not None:
        log.write_text(out.stdout + out.stderr)
    if out.returncode != 0:
        tail = "\n".join((out.stdout + out.stderr).splitlines()[-15:])
        raise ContainerError(f"{' '.join(argv[:3])} ... exited {out.returncode}:\n{tail}")


@dataclass(frozen=True)
class Rootfs:
    """The cached Debian userland (read-only once built)."""

    path: Path
    built_seconds: float | None  # None: it came from the cache

    @classmethod
    def ensure(cls) -> Rootfs:
        mirror = debian_mirror()
        key = hashlib.sha256(
            "\n".join(
                [RECIPE_VERSION, SUITE, mirror, *PACKAGES, *DISABLED_UNITS, *MASKED_UNITS]
            ).encode()
        ).hexdigest()[:12]
        home = cache_root() / f"{SUITE}-{key}"
        final = home / "rootfs"
        with _locked(cache_root() / ".rootfs.lock"):
            if (final / "usr/lib/systemd/systemd").exists():
                return cls(final, None)
            started = time.monotonic()
            staging = home / f"rootfs.tmp-{os.getpid()}"
            shutil.rmtree(staging, ignore_errors=True)
            home.mkdir(parents=True, exist_ok=True)
            try:
                _run(
                    [
                        "debootstrap",
                        "--variant=minbase",
                        f"--include={','.join(PACKAGES)}",
                        SUITE,
                        str(staging),
                        mirror,
                    ],
                    timeout=DEBOOTSTRAP_TIMEOUT,
                    log=home / "debootstrap.log",
                )
                _run(["chroot", str(staging), "apt-get", "clean"], timeout=120)
                root = f"--root={staging}"
                _run(["systemctl", root, "disable", *DISABLED_UNITS], timeout=60)
                _run(["systemctl", root, "mask", *MASKED_UNITS], timeout=60)
                (staging / "etc/hostname").write_text("rbtest\n")
            except BaseException:
                shutil.rmtree(staging, ignore_errors=True)
                raise
            staging.rename(final)
            return cls(final, time.monotonic() - started)


def _pinned_requirements() -> list[str]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    return [*project["build-system"]["requires"], *project["project"]["dependencies"]]


def wheelhouse() -> Path:
    """Wheels of the pinned dependencies (pyproject.toml), downloaded once with the host pip."""
    requirements = _pinned_requirements()
    key = hashlib.sha256("\n".join(requirements).encode()).hexdigest()[:12]
    final = cache_root() / f"wheels-{key}"
    with _locked(cache_root() / ".wheels.lock"):
        if (final / ".complete").exists():
            return final
        staging = cache_root() / f"wheels-{key}.tmp-{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        pip = [sys.executable, "-m", "pip", "download", "--quiet"]
        try:
            _run(
                [*pip, "--only-binary=:all:", "--dest", str(staging), *requirements],
                timeout=PIP_TIMEOUT,
            )
            (staging / ".complete").touch()
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        shutil.rmtree(final, ignore_errors=True)
        staging.rename(final)
        return final


def copy_source(dest: Path) -> None:
    """What ``pip install`` and deploy.sh need from the checkout (no .git, no caches): the
    build hook (setup.py), the license file and the generated completions and man page
    (share/) that pyproject.toml names are part of the build."""
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "build", ".mypy_cache")
    dest.mkdir(parents=True)
    for name in ("pyproject.toml", "setup.py", "MANIFEST.in", "README.md", "LICENSE"):
        shutil.copy2(REPO / name, dest / name)
    for name in ("src", "deploy", "share"):
        shutil.copytree(REPO / name, dest / name, ignore=ignore)


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str


class Container:
    """One booted container; use as a context manager (stopped and cleaned up on exit)."""

    def __init__(self, rootfs: Rootfs, workdir: Path, name: str | None = None) -> None:
        self.rootfs = rootfs
        self.workdir = workdir
        self.name = name or f"rbtest-{os.getpid()}"
        self.root = workdir / "merged"
        self._overlay = False
        self._nspawn: subprocess.Popen[bytes] | None = None
        self.leader: int | None = None
        self.boot_seconds: float | None = None
        self._cgroups: list[Path] = []

    # -- file system ----------------------------------------------------------------------

    def _prepare_root(self) -> None:
        upper, work = self.workdir / "upper", self.workdir / "work"
        for folder in (upper, work, self.root):
            folder.mkdir(parents=True)
        options = f"lowerdir={self.rootfs.path},upperdir={upper},workdir={work}"
        mount = subprocess.run(
            ["mount", "-t", "overlay", "overlay", "-o", options, str(self.root)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        if mount.returncode == 0:
            self._overlay = True
            return
        # No overlayfs here (e.g. the test folder is on overlayfs itself): a full copy.
        self.root.rmdir()
        _run(["cp", "-a", "--reflink=auto", str(self.rootfs.path), str(self.root)], timeout=300)

    def path(self, inside: str) -> Path:
        """The host path of ``inside`` (an absolute path in the container)."""
        return self.root / inside.lstrip("/")

    # -- lifecycle ------------------------------------------------------------------------

    def __enter__(self) -> Container:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        self._prepare_root()
        self._cgroups = [
            Path("/sys/fs/cgroup") / hierarchy / self.name
            for hierarchy in ("systemd", "unified")
            if (Path("/sys/fs/cgroup") / hierarchy).is_dir()
        ]
        for cgroup in self._cgroups:
            cgroup.mkdir(exist_ok=True)
        # The shell moves itself into our cgroups, then becomes nspawn: systemd in the
        # container then manages only what lies below them (the host's PID 1 is not systemd).
        # CAP_NET_ADMIN: nspawn withholds it from a container that shares the host's network,
        # so no unit inside could hold it; a real host's PID 1 has it (the unit grants it to
        # the daemon for WireGuard; the test configures no interface).
        argv = [
            "sh",
            "-c",
            'for c in "$@"; do echo $$ > "$c/cgroup.procs"; done; '
            'exec systemd-nspawn -D "$RB_ROOTDIR" --boot --machine="$RB_MACHINE" '
            "--register=no --keep-unit --console=read-only --capability=CAP_NET_ADMIN",
            "sh",
            *(str(c) for c in self._cgroups),
        ]
        env = {**os.environ, "RB_ROOTDIR": str(self.root), "RB_MACHINE": self.name}
        started = time.monotonic()
        console = (self.workdir / "console.log").open("wb")
        self._nspawn = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=console,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
        console.close()
        self.leader = self._find_leader()
        deadline = time.monotonic() + BOOT_TIMEOUT
        state = ""
        while time.monotonic() < deadline:
            state = self.run(
                ["systemctl", "is-system-running", "--wait"], timeout=BOOT_TIMEOUT
            ).stdout
            if state.strip() in ("running", "degraded"):
                break
            time.sleep(0.1)
        else:
            raise ContainerError(f"container did not boot: {state!r}; {self.console_tail()}")
        self.boot_seconds = time.monotonic() - started

    def _find_leader(self) -> int:
        assert self._nspawn is not None
        deadline = time.monotonic() + 10.0
        while time.monotonic() < deadline:
            if self._nspawn.poll() is not None:
                raise ContainerError(f"systemd-nspawn exited: {self.console_tail()}")
            for child in _children(self._nspawn.pid):
                with contextlib.suppress(OSError):
                    if Path(f"/proc/{child}/comm").read_text().strip() == "systemd":
                        return child
            time.sleep(0.05)
        raise ContainerError(f"no systemd in the container: {self.console_tail()}")

    def console_tail(self) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(
                (self.workdir / "console.log").read_text(errors="replace").splitlines()[-20:]
            )
        return ""

    def stop(self) -> None:
        """Power off (bounded), then SIGTERM/SIGKILL nspawn by PID, kill what is left in our
        cgroups by PID, remove the cgroups, unmount the overlay."""
        proc = self._nspawn
        if proc is not None and proc.poll() is None:
            if self.leader is not None:
                with contextlib.suppress(ContainerError, subprocess.TimeoutExpired):
                    self.run(["systemctl", "poweroff", "--no-block"], timeout=10)
            try:
                proc.wait(timeout=POWEROFF_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=5)
        for cgroup in self._cgroups:
            for pid in _cgroup_pids(cgroup):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        for cgroup in self._cgroups:
            _remove_cgroup(cgroup)
        self._nspawn = None
        self.leader = None
        if self._overlay:
            for _ in range(50):
                umount = subprocess.run(
                    ["umount", str(self.root)], capture_output=True, timeout=30, check=False
                )
                if umount.returncode == 0:
                    break
                time.sleep(0.1)
            self._overlay = False

    # -- inside ---------------------------------------------------------------------------

    def run(
        self,
        argv: Sequence[str],
        *,
        timeout: float = 60.0,
        env: dict[str, str] | None = None,
        input: str | None = None,
    ) -> Result:
        """Run ``argv`` inside the container (all of PID 1's namespaces, a clean environment)."""
        if self.leader is None:
            raise ContainerError("the container is not running")
        extra = [f"{k}={v}" for k, v in (env or {}).items()]
        command = [
            "nsenter",
            "-t",
            str(self.leader),
            "-a",
            "/usr/bin/env",
            "-i",
            f"PATH={_ENV_PATH}",
            "TERM=dumb",
            "SYSTEMD_COLORS=0",
            "SYSTEMD_PAGER=",
            "LC_ALL=C.UTF-8",
            *extra,
            *argv,
        ]
        out = subprocess.run(
            command, capture_output=True, text=True, timeout=timeout, input=input, check=False
        )
        return Result(out.returncode, out.stdout, out.stderr)

    def ok(self, argv: Sequence[str], **kwargs: object) -> str:
        result = self.run(argv, **kwargs)  # type: ignore[arg-type]
        if result.returncode != 0:
            raise ContainerError(
                f"{' '.join(argv)} exited {result.returncode}: {result.stderr.strip()[-2000:]}"
            )
        return result.stdout


def _children(pid: int) -> list[int]:
    with contextlib.suppress(OSError):
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
        return [int(p) for p in text.split()]
    return []


def _cgroup_pids(cgroup: Path) -> list[int]:
    pids: list[int] = []
    if not cgroup.is_dir():
        return pids
    for procs in cgroup.rglob("cgroup.procs"):
        with contextlib.suppress(OSError, ValueError):
            pids.extend(int(line) for line in procs.read_text().split())
    return pids


def _remove_cgroup(cgroup: Path) -> None:
    if not cgroup.is_dir():
        return
    # Deepest first; a cgroup folder goes with rmdir (its files are virtual).
    folders = sorted(
        (p for p in cgroup.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True
    )
    for folder in [*folders, cgroup]:
        for _ in range(20):
            try:
                folder.rmdir()
                break
            except FileNotFoundError:
                break
            except OSError:
                time.sleep(0.05)


def unit_seconds(text: str, key: str) -> float:
    """A time directive of a unit file (``RestartSec=3``, ``WatchdogSec=30``) in seconds."""
    match = re.search(rf"^{key}=(\d+)\s*$", text, re.MULTILINE)
    if match is None:
        raise ValueError(f"{key}= not found (or not in plain seconds)")
    return float(match.group(1))

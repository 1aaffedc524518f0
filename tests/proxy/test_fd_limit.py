"""The open-files limit: the pure planner, and the shell in a real child process whose limits
were lowered (setrlimit needs no privilege to lower, and raising soft up to hard is allowed)."""

from __future__ import annotations

import json
import resource
import subprocess
import sys

from hypothesis import given
from hypothesis import strategies as st

from rustbalance.proxy.fd_limit import BASE_DESCRIPTORS, descriptors_needed, plan_nofile

INF = resource.RLIM_INFINITY


def test_soft_below_need_is_raised_to_hard_without_warning() -> None:
    plan = plan_nofile(1024, 524288, 10_000)
    assert plan.new_soft == 524288 and plan.warning is None


def test_enough_already_changes_nothing() -> None:
    assert plan_nofile(65536, 65536, 1024) == plan_nofile(65536, 65536, 1024)
    plan = plan_nofile(65536, 65536, 1024)
    assert plan.new_soft is None and plan.warning is None


def test_hard_limit_too_low_warns_with_the_numbers_and_the_fix() -> None:
    plan = plan_nofile(1024, 4096, 10_000)
    assert plan.new_soft == 4096
    assert plan.warning is not None
    assert "proxy.max_connections = 10000 needs about 30256 file descriptors" in plan.warning
    assert "hard limit (RLIMIT_NOFILE) is 4096" in plan.warning
    assert f"beyond about {(4096 - BASE_DESCRIPTORS) // 3} will fail" in plan.warning
    assert "LimitNOFILE=" in plan.warning


def test_infinite_hard_limit_asks_for_what_is_needed() -> None:
    plan = plan_nofile(1024, INF, 5000)
    assert plan.new_soft == descriptors_needed(5000) and plan.warning is None
    assert plan_nofile(INF, INF, 5000).new_soft is None


@given(
    soft=st.integers(0, 2_000_000),
    extra=st.integers(0, 2_000_000),
    conns=st.integers(1, 1_000_000),
)
def test_plan_never_lowers_and_never_exceeds_hard(soft: int, extra: int, conns: int) -> None:
    hard = soft + extra
    plan = plan_nofile(soft, hard, conns)
    if plan.new_soft is not None:
        assert soft < plan.new_soft <= hard
    assert (plan.warning is not None) == (hard < descriptors_needed(conns))


_CHILD = """
import json, logging, resource, sys
resource.setrlimit(resource.RLIMIT_NOFILE, (int(sys.argv[1]), int(sys.argv[2])))
logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
from rustbalance.proxy.fd_limit import raise_nofile_limit
in_force = raise_nofile_limit(int(sys.argv[3]))
print(json.dumps([in_force, *resource.getrlimit(resource.RLIMIT_NOFILE)]))
"""


def _child(soft: int, hard: int, conns: int) -> tuple[list[int], str]:
    result = subprocess.run(
        [sys.executable, "-c", _CHILD, str(soft), str(hard), str(conns)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return json.loads(result.stdout), result.stderr


def test_the_daemon_shell_raises_the_soft_limit_of_a_real_process() -> None:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    top = 8192 if hard == INF else min(hard, 8192)
    limits, log = _child(256, top, 1000)
    assert limits == [top, top, top]
    assert f"INFO Raised the open-files limit from 256 to {top}" in log
    assert "WARNING" not in log
    limits, log = _child(256, 1024, 5000)
    assert limits == [1024, 1024, 1024]
    assert "WARNING proxy.max_connections = 5000 needs about 15256 file descriptors" in log

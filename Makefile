# RustBalance: every target installs what it needs on a fresh Debian 12 machine.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Debian packages the product, its tests, the demo and the benchmarks use.
APT_PACKAGES := tor python3-venv haproxy socat shellcheck iproute2 wireguard-tools wireguard-go curl systemd faketime systemd-container debootstrap zsh man-db prometheus etcd-server etcd-client
APT_STAMP := .apt-installed
DEV_LOCK := requirements/dev.lock
RUNTIME_LOCK := requirements/runtime.lock
PYTHON ?= $(shell command -v python3.11 || command -v python3)

# What `make deb` needs besides (only that target installs them): debhelper runs the build,
# python3-venv makes the venvs, python3-pip downloads the locked wheels, lintian checks the result.
DEB_APT_PACKAGES := debhelper dpkg-dev python3-venv python3-pip lintian
DEB_APT_STAMP := .apt-installed-deb
BUILD_LOCK := requirements/build.lock
# make deb: the package and its build files go here (dpkg-buildpackage would write into ..).
DEB_OUT := build/deb
DEB_WHEELHOUSE := $(DEB_OUT)/wheelhouse
# What the package is built from: copied, so the build leaves the checkout untouched.
DEB_SOURCES := debian src share deploy docs requirements pyproject.toml setup.py MANIFEST.in \
	README.md LICENSE

.PHONY: all deps test lint unit demo bench cli-files lock clean config-docs deb

all: test

# $(1): the Debian packages; the ones missing are installed.
define apt_install
	@missing=""; for p in $(1); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  SUDO=""; [ "$$(id -u)" = 0 ] || SUDO=sudo; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing; \
	fi
	@touch $@
endef

$(APT_STAMP): Makefile
	$(call apt_install,$(APT_PACKAGES))

$(DEB_APT_STAMP): Makefile
	$(call apt_install,$(DEB_APT_PACKAGES))

# The venv gets exactly the lock (every direct and indirect dependency, with hashes), then the
# project itself without resolving anything (--no-deps) and built by the locked setuptools.
# PYTHON picks the interpreter (any >= 3.11), e.g.
# make test PYTHON=$(pyenv prefix 3.13.0)/bin/python3.13 VENV=.venv-3.13
$(STAMP): pyproject.toml $(DEV_LOCK) $(APT_STAMP)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --require-hashes -r $(DEV_LOCK)
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	@touch $@

deps: $(STAMP)

lint: deps
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks
	$(VENV)/bin/mypy

test: lint
	$(VENV)/bin/pytest

# No root needed, under a minute: the tor, slow and root tiers are left out (and counted),
# and fuzz tests run a tenth of their example budgets (tests/budget.py).
unit: deps
	$(VENV)/bin/pytest -m "not tor and not slow and not root" --fuzz-scale 0.1

# docs/config.md's key reference, generated from src/rustbalance/config/schema.py.
config-docs: deps
	$(PY) -m rustbalance.config.docs docs/config.md

demo: deps
	$(PY) -m rustbalance.demo

# Shell completions and the man page under share/, generated from the argparse definitions
# (a test fails when the committed files are out of date).
cli-files: deps
	$(PY) -m tests.cli.cli_files

# Re-resolve the locks after a change of pyproject.toml's pins (needs PyPI): one resolution for
# every Python >= 3.11 (--universal); the runtime lock is the subset the product installs
# (the Debian package) and takes its versions from the dev lock.
lock: deps
	$(VENV)/bin/uv pip compile pyproject.toml requirements/build.in --extra dev --universal \
	  --python-version 3.11 --generate-hashes --quiet -o $(DEV_LOCK)
	$(VENV)/bin/uv pip compile pyproject.toml --universal --python-version 3.11 \
	  --generate-hashes --quiet -c $(DEV_LOCK) -o $(RUNTIME_LOCK)
	$(VENV)/bin/uv pip compile requirements/build.in --universal --python-version 3.11 \
	  --generate-hashes --quiet -c $(DEV_LOCK) -o $(BUILD_LOCK)

# The Debian package (debian/, README "Installing from the Debian package"): the locked
# wheels are downloaded and hash-checked first (the only step that needs the network; kept
# between builds, and a complete wheelhouse is checked offline), then dpkg-buildpackage builds on a fresh copy of the sources, offline, and
# lintian must report nothing that debian/rustbalance.lintian-overrides does not explain.
# Result: $(DEB_OUT)/rustbalance_<version>_<arch>.deb.
DEB_DOWNLOAD := /usr/bin/python3 -m pip download --quiet --disable-pip-version-check \
	--require-hashes --only-binary=:all: --dest $(DEB_WHEELHOUSE) -r $(RUNTIME_LOCK) -r $(BUILD_LOCK)

deb: $(DEB_APT_STAMP)
	$(DEB_DOWNLOAD) --no-index --find-links $(DEB_WHEELHOUSE) 2>/dev/null || $(DEB_DOWNLOAD)
	rm -rf $(DEB_OUT)/src $(DEB_OUT)/rustbalance_* $(DEB_OUT)/rustbalance-dbgsym_*
	mkdir -p $(DEB_OUT)/src
	tar -c --exclude=__pycache__ --exclude='*.egg-info' $(DEB_SOURCES) | tar -x -C $(DEB_OUT)/src
	cd $(DEB_OUT)/src && RB_WHEELHOUSE=$(abspath $(DEB_WHEELHOUSE)) \
	  dpkg-buildpackage --build=binary --no-sign
	lintian --fail-on error,warning,info --info $(DEB_OUT)/rustbalance_*.changes
	@ls $(DEB_OUT)/rustbalance_*.deb

bench: deps
	$(PY) -m benchmarks.run

clean:
	rm -rf $(VENV) $(APT_STAMP) $(DEB_APT_STAMP) $(DEB_OUT) .pytest_cache .mypy_cache .ruff_cache

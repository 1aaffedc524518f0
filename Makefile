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

.PHONY: all deps test lint unit demo bench cli-files lock clean config-docs

all: test

$(APT_STAMP): Makefile
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  SUDO=""; [ "$$(id -u)" = 0 ] || SUDO=sudo; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing; \
	fi
	@touch $@

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

bench: deps
	$(PY) -m benchmarks.run

clean:
	rm -rf $(VENV) $(APT_STAMP) .pytest_cache .mypy_cache .ruff_cache

# RustBalance: every target installs what it needs on a fresh Debian 12 machine.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Debian packages the product, its tests, the demo and the benchmarks use.
APT_PACKAGES := tor python3-venv haproxy socat shellcheck iproute2 wireguard-tools wireguard-go curl systemd faketime systemd-container debootstrap etcd-server etcd-client
APT_STAMP := .apt-installed

.PHONY: all deps test lint unit demo bench clean

all: test

$(APT_STAMP):
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  SUDO=""; [ "$$(id -u)" = 0 ] || SUDO=sudo; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing; \
	fi
	@touch $@

$(STAMP): pyproject.toml $(APT_STAMP)
	@PYBIN=$$(command -v python3.11 || command -v python3); \
	test -x $(PY) || $$PYBIN -m venv $(VENV)
	$(PY) -m pip install -q -e '.[dev]'
	@touch $@

deps: $(STAMP)

lint: deps
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks
	$(VENV)/bin/mypy

test: lint
	$(VENV)/bin/pytest

unit: deps
	$(VENV)/bin/pytest -m "not tor"

demo: deps
	$(PY) -m rustbalance.demo

bench: deps
	$(PY) -m benchmarks.run

clean:
	rm -rf $(VENV) $(APT_STAMP) .pytest_cache .mypy_cache .ruff_cache

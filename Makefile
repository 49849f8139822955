# The two set-up commands of the README. Both are idempotent: the virtualenv is rebuilt only
# when requirements.lock or pyproject.toml change.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=
SOAK_ARGS ?=

.PHONY: demo test venv sysdeps bench soak clean-venv

venv: $(STAMP)

$(STAMP): requirements.lock pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check pip==24.3.1 setuptools==84.2.1
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.lock
	$(PY) -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
	@touch $@

# perf_analyzer (inside tritonclient[all]) links against Debian's libb64.
sysdeps:
	@if ! /sbin/ldconfig -p 2>/dev/null | grep -q 'libb64.so.0d'; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing libb64-0d for perf_analyzer"; \
	    (apt-get install -y -q libb64-0d >/dev/null 2>&1 || (apt-get update -q >/dev/null && apt-get install -y -q libb64-0d >/dev/null)) \
	      || echo "warning: could not install libb64-0d; perf_analyzer will not run"; \
	  else echo "note: libb64-0d missing and not root; perf_analyzer will not run (apt-get install libb64-0d)"; fi; \
	fi

test: venv sysdeps
	$(PY) -m pytest $(PYTEST_ARGS)

demo: venv sysdeps
	$(PY) -m edge_runtime.demo

bench: venv sysdeps
	$(PY) -m plugin.cli bench

# 32 concurrent edge sessions x 200 tokens against one tritonserver (not part of `make test`);
# figures in runs/soak/summary.json. SOAK_ARGS="--sessions 8 --tokens 40" for a shorter one.
soak: venv sysdeps
	$(PY) -m tests.soak $(SOAK_ARGS)

clean-venv:
	rm -rf $(VENV)

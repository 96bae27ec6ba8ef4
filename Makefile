# Every target sets itself up: a fresh clone needs only `make run` or `make test`.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export DS_BUILD_OPS := 0

.PHONY: run test setup proto prometheus down clean

run: setup
	$(BIN)/moe-serve run

test: setup prometheus
	$(BIN)/python -m pytest -q -ra tests

setup: $(STAMP) proto

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first and pinned: it takes the CPU wheel on this disk, never a CUDA build
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	# guided decoding's xgrammar without its triton requirement (~1 GB, GPU kernels only): what it
	# imports is in pyproject.toml's dependencies
	$(BIN)/pip install -q --no-deps xgrammar==0.2.9
	touch $(STAMP)

proto: $(STAMP)
	$(BIN)/python -m serving.api.codegen

# Debian's prometheus package: a real Prometheus server and promtool, for the metrics tests.
prometheus:
	@command -v promtool >/dev/null 2>&1 || { \
	  echo "installing Debian's prometheus package (promtool) ..."; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends prometheus >/dev/null; }

down:
	$(BIN)/moe-serve down

clean:
	rm -rf $(VENV) serving/api/gen .moe-serve

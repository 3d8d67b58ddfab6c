# vlds: the two commands. Both create .venv when missing and install the project into it.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: train test install lint bench repro clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

# The main job on the embedded default (tiny CLIP-T5, single adapter, shapes world, CPU ok).
train: $(STAMP)
	PATH=$(abspath $(BIN)):$$PATH OMP_NUM_THREADS=$${OMP_NUM_THREADS:-2} \
		$(BIN)/deepspeed vlds/train.py --deepspeed ds_configs/zero2.json $(ARGS)

# Serial: the tests launch real training subprocesses with their own rendezvous ports and
# timing-sensitive signals; `make test PYTEST_ARGS="-n 2 --dist loadfile"` halves the time on an
# idle 2-core machine (pytest-xdist is installed) but was flaky under outside load.
test: $(STAMP)
	PATH=$(abspath $(BIN)):$$PATH $(BIN)/python -m pytest -q $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check vlds tests bench tune
	$(BIN)/ruff format --check vlds tests bench tune

bench: $(STAMP)
	$(BIN)/python bench/step_time.py

# The paper's experiment in miniature: every PEFT method, 3 seeds, report + plot (bench/).
repro: $(STAMP)
	PATH=$(abspath $(BIN)):$$PATH $(BIN)/python bench/mini_repro.py $(ARGS)

clean:
	rm -rf runs .pytest_cache

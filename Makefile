# vlds: the two commands. Both create .venv when missing and install the project into it.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: train test install lint bench clean

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

# Two workers, one test file each at a time: most tests launch real training subprocesses
# (one thread each), so the two cores stay busy and module-scoped runs are shared.
test: $(STAMP)
	PATH=$(abspath $(BIN)):$$PATH $(BIN)/python -m pytest -q -n 2 --dist loadfile $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check vlds tests bench
	$(BIN)/ruff format --check vlds tests bench

bench: $(STAMP)
	$(BIN)/python bench/step_time.py

clean:
	rm -rf runs .pytest_cache

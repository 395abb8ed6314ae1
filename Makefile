# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
FMNIST := /usr/share/datasets/fashion-mnist

.PHONY: demo test venv data lint bench reliability clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

# The embedded default dataset: Debian's dataset-fashion-mnist (real 28x28 images).
data:
	@if [ ! -d $(FMNIST) ]; then \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist; \
	  else echo "Fashion-MNIST is missing: run 'sudo apt-get install dataset-fashion-mnist' and retry"; exit 1; fi; \
	fi

demo: $(STAMP) data
	$(BIN)/davit demo

# Two pytest-xdist workers where there are two cores, each test on one torch thread (conftest.py): much of
# the suite is tracing, compiling and subprocess start-up, not torch's threads (2-core VM like CI's: 637 s in
# one process, 342-434 s in six runs with two workers). TEST_WORKERS=0 runs the suite in one process.
TEST_WORKERS ?= $(shell n=$$(nproc 2>/dev/null || echo 1); if [ $$n -ge 2 ]; then echo 2; else echo 0; fi)

test: $(STAMP) data
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist worksteal

lint: $(STAMP)
	$(BIN)/ruff check .

# crash/fault driver (~20 SIGKILL/SIGTERM/SIGINT trials + a torchrun rank kill, then the same for each of the
# segmentation and detection trainers); figures into docs/reliability.md
reliability: $(STAMP) data
	$(BIN)/python benchmarks/faults/crash_driver.py --trials 20 --torchrun \
	  --json benchmarks/faults/results.json --doc docs/reliability.md
	for t in segment detect; do \
	  $(BIN)/python benchmarks/faults/crash_driver.py --task $$t --trials 20 --torchrun \
	    --json benchmarks/faults/results-$$t.json --doc docs/reliability.md || exit 1; \
	done

# CPU speed tables against timm (docs/benchmarks.md); run on an otherwise idle machine
bench: $(STAMP)
	bash benchmarks/run_cpu.sh benchmarks/results/cpu

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info

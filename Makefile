# The two commands of the README. Each makes the virtual environment .venv when it is missing.
PYTHON ?= python3.11
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: demo test bench-env

$(STAMP): pyproject.toml constraints.txt
	@command -v $(PYTHON) >/dev/null || { echo "biofm needs Python 3.11 ($(PYTHON) not found); set PYTHON=/path/to/python3.11"; exit 1; }
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VENV)/bin/python -m pip install --quiet -c constraints.txt torch==2.13.0
	$(VENV)/bin/python -m pip install --quiet -c constraints.txt -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/biofm demo

test: $(STAMP)
	$(VENV)/bin/ruff check biofm tests benchmarks scripts
	$(VENV)/bin/ruff format --check biofm tests benchmarks scripts
	$(VENV)/bin/python -m pytest -n 2 -rs --durations=15 tests

# benchmarks/vs_chemprop.py's environment: biofm and chemprop 2.3.1 (the `bench` extra) with every pin of
# constraints.txt but RDKit, which chemprop's C++ featuriser (cuik-molmaker-pin) needs at 2026.03.6.
BENCH := .venv-bench
bench-env: $(BENCH)/.installed
$(BENCH)/.installed: pyproject.toml constraints.txt
	test -x $(BENCH)/bin/python || $(PYTHON) -m venv $(BENCH)
	sed 's/^rdkit==.*/rdkit==2026.3.6/' constraints.txt > $(BENCH)/constraints.txt
	$(BENCH)/bin/python -m pip install --quiet --upgrade pip
	$(BENCH)/bin/python -m pip install --quiet -c $(BENCH)/constraints.txt torch==2.13.0
	$(BENCH)/bin/python -m pip install --quiet -c $(BENCH)/constraints.txt -e ".[molecules,bench]"
	touch $@

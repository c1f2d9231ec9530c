# The two commands of the README. Each makes the virtual environment .venv when it is missing.
PYTHON ?= python3.11
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: demo test

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

# One-command entry points (see README). Everything installs into .venv from the repo's files.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: run test test-slow lint build-default clean-venv

$(BIN)/.installed: requirements.txt requirements-dev.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q -r requirements-dev.txt
	touch $@

# Set up and start the app on the built-in default (http://localhost:8501).
run: $(BIN)/.installed
	$(BIN)/streamlit run app.py

# Set up and run the default (fast) test suite, then lint.
test: $(BIN)/.installed
	$(BIN)/python -m pytest -q
	$(BIN)/ruff check .

# Slow tests: full-size built-in build, real browser.
test-slow: $(BIN)/.installed
	$(BIN)/python -m pytest -q -m slow || [ $$? -eq 5 ]

build-default: $(BIN)/.installed
	$(BIN)/python -m simu_core build-default

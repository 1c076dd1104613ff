"""Builds the Cython extensions run._run (run.pyx) and runq._runq (runq.pyx).

The compiler flags come from LLAMA_CFLAGS, so that the Makefile's targets mean what they mean in
llama2.c (run: -O3, runfast: -Ofast, runomp: -Ofast -fopenmp -march=native, ...). Without it,
`pip install .` builds like `make runomp`.
"""
import os
import shlex
import sys

from Cython.Build import cythonize
from setuptools import Extension, setup

MSVC = sys.platform == "win32"
DEFAULT_CFLAGS = "/O2 /fp:fast /openmp" if MSVC else "-Ofast -fopenmp -march=native"


def compiler_flags():
    cflags = shlex.split(os.environ.get("LLAMA_CFLAGS", DEFAULT_CFLAGS))
    if MSVC:
        return cflags, []
    # Python's own CFLAGS carry -fwrapv, which stops gcc from vectorizing the matmul's
    # w[i * n + j] loop (5 GB/s instead of 31 GB/s here): undo it after the defaults.
    cflags.append("-fno-wrapv")
    openmp = [f for f in cflags if f in ("-fopenmp", "-fopenmp-simd")]
    return cflags, [f for f in openmp if f == "-fopenmp"]


REPO = os.path.dirname(os.path.abspath(__file__))
# the C headers a .pyx includes (a change rebuilds it)
DEPENDS = {"run.pyx": ["f32dot.h", "argmax.h"], "runq.pyx": ["q8matmul.h", "f32dot.h", "argmax.h"]}


def extension(name, source):
    cflags, ldflags = compiler_flags()
    return Extension(name, [source], extra_compile_args=cflags, extra_link_args=ldflags,
                     libraries=[] if MSVC else ["m"], include_dirs=[REPO],
                     depends=DEPENDS.get(source, []))


debug = os.environ.get("LLAMA_DEBUG") == "1"
directives = dict(language_level=3, boundscheck=debug, wraparound=debug, cdivision=True,
                  initializedcheck=debug)
sources = [("run._run", "run.pyx"), ("runq._runq", "runq.pyx")]
missing = [src for _, src in sources if not os.path.exists(src)]
if missing:  # a build without one of the programs is no build: say so instead of skipping it
    sys.exit(f"setup.py: {', '.join(missing)} not found (run setup.py from the repository's root)")
extensions = [extension(name, src) for name, src in sources]

setup(packages=["run", "runq", "llama2_cython"],
      ext_modules=cythonize(extensions, compiler_directives=directives, build_dir="build", quiet=True))

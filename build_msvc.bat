@echo off
rem Windows build with MSVC: run from a "x64 Native Tools Command Prompt for VS" in the repo root.
rem Builds the Cython extensions (run.pyx, runq.pyx) with /O2 /fp:fast /openmp, as llama2.c builds
rem run.c with cl; OpenMP uses all cores unless OMP_NUM_THREADS is set.
python -m pip install -r requirements.txt || exit /b 1
set LLAMA_CFLAGS=/O2 /fp:fast /openmp
python setup.py build_ext --inplace || exit /b 1
echo Built. Try: python -m run testdata\tiny_gqa.bin -z testdata\tok512.bin -i "Once upon a time"

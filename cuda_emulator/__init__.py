"""A CPU stand-in for the parts of PyCUDA that run_cuda.py uses, to run its CUDA kernels anywhere.

    RUN_CUDA_EMULATOR=1 python run_cuda.py model.bin [flags]

`cuda_emulator.driver`, `cuda_emulator.compiler.SourceModule` and `cuda_emulator.autoinit` mirror
pycuda.driver, pycuda.compiler and pycuda.autoinit. Kernels are compiled by g++ behind a prelude
header (include/cuda_emulator.h) and run block after block, each CUDA thread a fiber, with real
barriers for __syncthreads() and the warp shuffles. A launch fails with driver.LaunchError, naming
the block and thread, where a GPU would hang, fault or compute garbage:

- deadlock: threads waiting at a barrier that others never reach (or left by exiting);
- shuffles whose mask names lanes that do not exist, lanes that disagree on mask or call site,
  reads from lanes that exited;
- misaligned float2/float4 loads and stores, and misaligned __ldg;
- out-of-bounds device memory (guard pages, and canaries in the slack bytes after each launch)
  and out-of-bounds dynamic shared memory (guard pages and canaries);
- shared memory and fresh allocations hold NaN, so that a missing barrier or a read of memory
  nobody wrote shows in the results.

Settings (environment variables, or configure() at run time):
- CUDA_EMULATOR_SCHEDULE: `in-order` (default: blocks in order; in a block, always the lowest
  runnable thread, so warp 0 runs as far as it can, through its shuffles, before warp 1 starts) or
  `random:SEED` (blocks in a random order; at each __syncthreads() the warps' order is drawn anew,
  lanes are picked at random). The same seed repeats the same orders.
- CUDA_EMULATOR_DEVICE: `h100` (default: 132 SMs, 227 KiB of shared memory per block) or `few-sms`
  (2 SMs, 99 KiB, 64 MiB of memory).
- CUDA_EMULATOR_CACHE: where compiled modules are kept (default ~/.cache/cuda_emulator).
- CUDA_EMULATOR_NVCC=0: do not ask nvcc for the kernels' registers even when it is installed
  (without nvcc, a kernel is assumed to use 64 registers per thread).

driver.counters counts launches (per kernel too) and the bytes copied host to device and back.
Floats are not the GPU's to the bit: glibc's expf/sinf and the order g++ gives to a sum differ
from CUDA's by ulps.
"""
from . import driver


def configure(device=None, schedule=None):
    """Change the device profile or the schedule; returns the previous (device, schedule)."""
    previous = (driver.settings.device, driver.settings.schedule)
    if device is not None:
        if device not in driver.PROFILES:
            raise ValueError(f"unknown device profile {device!r}: {', '.join(driver.PROFILES)}")
        driver.settings.device = device
    if schedule is not None:
        driver.parse_schedule(schedule)
        driver.settings.schedule = schedule
        driver.settings.launches = 0  # the same launches in the same order again
    return previous

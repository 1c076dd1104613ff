"""SourceModule: a CUDA C source compiled by g++ into a shared library, loaded with ctypes.

As PyCUDA does, the source is wrapped in extern "C" { } (unless no_extern_c). Before that comes the
prelude include/cuda_emulator.h (CUDA's qualifiers, built-ins and vector types); after it, one
entry stub per __global__ function; include/runtime.cpp, which runs the launches, is linked in.
`extern __shared__ T name[];` cannot be a macro: it is rewritten here, in the module's source (not
in the headers it includes), into a pointer to the launch's dynamic shared memory.

When nvcc is on the PATH, the source is also compiled the way PyCUDA compiles it (nvcc --cubin for
the device profile's architecture, with `-Xptxas -v`): its errors are the module's errors, and each
kernel's registers, static shared memory and stack frame become its function attributes.
Builds are cached in $CUDA_EMULATOR_CACHE (default ~/.cache/cuda_emulator).
"""
import ctypes
import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
import warnings
from functools import lru_cache
from pathlib import Path

from . import driver

INCLUDE_DIR = Path(__file__).resolve().parent / "include"
CXX_FLAGS = ["-std=gnu++17", "-O2", "-fPIC", "-shared", "-fno-strict-aliasing", "-ffp-contract=off",
             "-fvisibility=hidden", "-fno-stack-protector", "-fno-plt"]

EXTERN_SHARED = re.compile(r"extern\s+__shared__\s+([^;\[\]]*?)\s*\b(\w+)\s*\[\s*\]\s*;")
ALIGN = re.compile(r"__align__\s*\(\s*\w+\s*\)")
KERNEL = re.compile(r"__global__\b[^;{}()]*?\b(\w+)\s*\(")
QUOTED_INCLUDE = re.compile(r'^\s*#\s*include\s*"([^"]+)"', re.M)
PTXAS_ENTRY = re.compile(r"Compiling entry function '(\w+)' for '(\w+)'")
PTXAS_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
PTXAS_USAGE = re.compile(r"Used (\d+) registers(.*)")


def rewrite_extern_shared(source):
    """`extern __shared__ __align__(16) float xs[];` -> `float* const xs = (float*)...;` (same line)."""
    def pointer(match):
        element = ALIGN.sub("", match.group(1)).strip()
        return f"{element}* const {match.group(2)} = ({element}*)cuemu::dynamic_shared;"
    return EXTERN_SHARED.sub(pointer, source)


def kernel_names(source):
    """The __global__ functions of a source, in order of appearance."""
    plain = re.sub(r"//[^\n]*|/\*.*?\*/|__launch_bounds__\s*\([^)]*\)", " ", source, flags=re.S)
    return list(dict.fromkeys(KERNEL.findall(plain)))


def parse_ptxas(text):
    """`nvcc -Xptxas -v` output -> {kernel: {registers, shared, stack, spill_stores, spill_loads}}."""
    kernels, current = {}, None
    for line in text.splitlines():
        if m := PTXAS_ENTRY.search(line):
            current = kernels.setdefault(m.group(1), {"arch": m.group(2), "registers": 0, "shared": 0,
                                                      "stack": 0, "spill_stores": 0, "spill_loads": 0})
        elif current is not None and (m := PTXAS_FRAME.search(line)):
            current["stack"], current["spill_stores"], current["spill_loads"] = map(int, m.groups())
        elif current is not None and (m := PTXAS_USAGE.search(line)):
            current["registers"] = int(m.group(1))
            if s := re.search(r"(\d+) bytes smem", m.group(2)):
                current["shared"] = int(s.group(1))
    return kernels


def _included_files(source, include_dirs, seen=None):
    """The user headers a source pulls in with #include "...", recursively (for the cache key)."""
    seen = {} if seen is None else seen
    for name in QUOTED_INCLUDE.findall(source):
        for directory in include_dirs:
            path = Path(directory) / name
            if path.is_file() and str(path) not in seen:
                text = path.read_text(errors="replace")
                seen[str(path)] = text
                _included_files(text, include_dirs, seen)
                break
    return seen


def default_cache_dir():
    """$CUDA_EMULATOR_CACHE, else ~/.cache/cuda_emulator, else one in the temporary directory."""
    base = os.environ.get("CUDA_EMULATOR_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "cuda_emulator")
    try:
        os.makedirs(base, exist_ok=True)
    except OSError:
        base = os.path.join(tempfile.gettempdir(), f"cuda_emulator-{os.getuid()}")
        os.makedirs(base, exist_ok=True)
    return base


@lru_cache(maxsize=None)
def _tool_version(tool):
    try:
        proc = subprocess.run([tool, "--version"], capture_output=True, text=True)
    except OSError:
        return None
    return proc.stdout if proc.returncode == 0 else None


def _cached_build(key, suffix, build, directory):
    """The file named by key in the cache, made by build(path) on a miss (written, then renamed)."""
    path = os.path.join(directory, key + suffix)
    if not os.path.exists(path):
        fd, tmp = tempfile.mkstemp(dir=directory, suffix=suffix + ".tmp")
        os.close(fd)
        try:
            build(tmp)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return path


def _entry_stubs(names):
    """Per kernel: the entry the launcher calls, and the description of its parameters."""
    return "".join(
        f'extern "C" __attribute__((visibility("default"))) void cuemu_entry_{name}(const char* p)'
        f" {{ cuemu::call({name}, p); }}\n"
        f'extern "C" __attribute__((visibility("default"))) int cuemu_params_{name}(int* k, int* s)'
        f" {{ return cuemu::describe({name}, k, s); }}\n" for name in names)


def _nvcc_info(source, include_dirs, options, arch, nvcc, directory):
    """Compile as PyCUDA does; returns parse_ptxas() of the output, or None without nvcc.

    Raises driver.CompileError when nvcc rejects the source; warns when it says anything else.
    """
    if os.environ.get("CUDA_EMULATOR_NVCC", "1") == "0" or shutil.which(nvcc) is None:
        return None
    version = _tool_version(nvcc)
    if version is None:
        return None
    command = [nvcc, "--cubin", f"-arch={arch}", "-Xptxas", "-v", *options,
               *(f"-I{d}" for d in include_dirs)]
    key = hashlib.sha256(json.dumps([source, command, version, sorted(
        _included_files(source, include_dirs).items())]).encode()).hexdigest()[:32]

    def build(out):
        with tempfile.TemporaryDirectory() as tmp:
            Path(tmp, "kernel.cu").write_text(source)
            proc = subprocess.run(command + ["kernel.cu"], cwd=tmp, capture_output=True, text=True)
            if proc.returncode != 0:
                raise driver.CompileError(f"nvcc compilation of the module failed:\n{proc.stderr}")
            text = proc.stdout + proc.stderr
            said = "\n".join(line for line in text.splitlines() if "ptxas info" not in line
                             and not PTXAS_FRAME.search(line))
            Path(out).write_text(json.dumps({"kernels": parse_ptxas(text), "said": said}))

    info = json.loads(Path(_cached_build(key, ".json", build, directory)).read_text())
    if info["said"].strip():
        warnings.warn(f"nvcc succeeded, but said the following:\n{info['said']}", stacklevel=3)
    return info["kernels"]


class SourceModule:
    """pycuda.compiler.SourceModule for the emulator: get_function(name) gives a launchable kernel."""

    def __init__(self, source, nvcc="nvcc", options=None, keep=False, no_extern_c=False,
                 arch=None, code=None, cache_dir=None, include_dirs=()):
        del keep, code  # PyCUDA's options for nvcc's output files; nothing to keep here
        profile = driver.current_profile()
        include_dirs = [str(d) for d in include_dirs]
        directory = cache_dir or default_cache_dir()
        wrapped = source if no_extern_c else 'extern "C" {\n%s\n}\n' % source
        self._ptxas = _nvcc_info(wrapped, include_dirs, list(options or []), arch or profile.arch,
                                 nvcc, directory)
        self._names = kernel_names(source)
        unit = ('#include "cuda_emulator.h"\n'
                + ("" if no_extern_c else 'extern "C" {\n')
                + '#line 1 "source.cu"\n' + rewrite_extern_shared(source) + "\n"
                + ("" if no_extern_c else "}\n")
                + _entry_stubs(self._names))
        cxx = os.environ.get("CXX", "g++")
        command = [cxx, *CXX_FLAGS, f"-I{INCLUDE_DIR}", *(f"-I{d}" for d in include_dirs)]
        runtime = [(INCLUDE_DIR / name).read_text() for name in ("cuda_emulator.h", "runtime.cpp")]
        key = hashlib.sha256(json.dumps([unit, runtime, command, _tool_version(cxx), sorted(
            _included_files(source, include_dirs).items())]).encode()).hexdigest()[:32]

        def build(out):
            with tempfile.TemporaryDirectory() as tmp:
                Path(tmp, "module.cpp").write_text(unit)
                sources = ["module.cpp", str(INCLUDE_DIR / "runtime.cpp")]
                try:
                    proc = subprocess.run(command + ["-o", out, *sources], cwd=tmp,
                                          capture_output=True, text=True)
                except OSError as e:
                    raise driver.CompileError(
                        f"the emulator needs a C++ compiler ({cxx}: {e.strerror})") from None
                if proc.returncode != 0:
                    raise driver.CompileError(
                        f"the emulator's compilation ({cxx}) failed:\n{proc.stderr}")

        self._path = _cached_build(key, ".so", build, directory)
        self._library = ctypes.CDLL(self._path)
        launch = self._library.cuemu_launch
        launch.restype = ctypes.c_int
        launch.argtypes = [ctypes.c_void_p, ctypes.c_char_p] + [ctypes.c_uint] * 6 + [
            ctypes.c_size_t, ctypes.c_int, ctypes.c_uint64, ctypes.POINTER(ctypes.c_uint64),
            ctypes.c_int, ctypes.c_char_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_uint64),
            ctypes.POINTER(ctypes.c_int)]
        self._library.cuemu_static_shared_bytes.restype = ctypes.c_size_t
        self._functions = {}

    def get_function(self, name):
        if name not in self._functions:
            if name not in self._names:
                raise driver.LogicError(
                    f"cuModuleGetFunction failed: named symbol not found ({name})")
            describe = getattr(self._library, f"cuemu_params_{name}")
            kinds, sizes = (ctypes.c_int * 64)(), (ctypes.c_int * 64)()
            count = describe(kinds, sizes)
            ptxas = (self._ptxas or {}).get(name)
            self._functions[name] = driver.Function(
                name, self._library, ctypes.cast(getattr(self._library, f"cuemu_entry_{name}"),
                                                 ctypes.c_void_p).value,
                list(zip(kinds[:count], sizes[:count])), ptxas,
                self._library.cuemu_static_shared_bytes())
        return self._functions[name]

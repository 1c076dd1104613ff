"""pycuda.driver for the emulator: devices, memory, kernel functions and launches.

Device memory is host memory, one mapping per allocation: a guard page on each side, the
allocation placed so that it ends as close to the upper guard page as 256-byte alignment allows
(cudaMalloc's alignment), and the slack bytes around it filled with a NaN canary that is checked
after every launch that was given a pointer into it. Fresh allocations hold another NaN, so reading
memory nobody wrote shows. `counters` counts launches and the bytes copied between host and device.
"""
import bisect
import collections
import ctypes
import mmap
import os
import struct
import threading
from dataclasses import dataclass
from enum import IntEnum

import numpy as np

PAGE = mmap.PAGESIZE
PROT_NONE = 0
ALIGNMENT = 256
CANARY = 0x7FC0DEAD  # slack bytes around allocation n: a quiet NaN, its payload varied by n
FRESH = 0x7FC0FFEE  # a fresh allocation's contents: a quiet NaN
REGISTERS_WITHOUT_NVCC = 64  # the most a 1024-thread block allows: assumed when nvcc is absent


class Error(Exception):
    """Every error of the driver, as pycuda.driver.Error."""


class LogicError(Error):
    pass


class LaunchError(Error):
    pass


class MemoryError(Error):  # noqa: A001  (pycuda.driver.MemoryError)
    pass


class CompileError(Error):
    pass


class device_attribute(IntEnum):  # noqa: N801  (PyCUDA's names)
    MAX_THREADS_PER_BLOCK = 1
    MAX_BLOCK_DIM_X = 2
    MAX_BLOCK_DIM_Y = 3
    MAX_BLOCK_DIM_Z = 4
    MAX_GRID_DIM_X = 5
    MAX_GRID_DIM_Y = 6
    MAX_GRID_DIM_Z = 7
    MAX_SHARED_MEMORY_PER_BLOCK = 8
    TOTAL_CONSTANT_MEMORY = 9
    WARP_SIZE = 10
    MAX_REGISTERS_PER_BLOCK = 12
    CLOCK_RATE = 13
    MULTIPROCESSOR_COUNT = 16
    MEMORY_CLOCK_RATE = 36
    GLOBAL_MEMORY_BUS_WIDTH = 37
    L2_CACHE_SIZE = 38
    MAX_THREADS_PER_MULTIPROCESSOR = 39
    COMPUTE_CAPABILITY_MAJOR = 75
    COMPUTE_CAPABILITY_MINOR = 76
    MAX_SHARED_MEMORY_PER_MULTIPROCESSOR = 81
    MAX_REGISTERS_PER_MULTIPROCESSOR = 82
    MAX_SHARED_MEMORY_PER_BLOCK_OPTIN = 97
    MAX_BLOCKS_PER_MULTIPROCESSOR = 106
    RESERVED_SHARED_MEMORY_PER_BLOCK = 111


class function_attribute(IntEnum):  # noqa: N801
    MAX_THREADS_PER_BLOCK = 0
    SHARED_SIZE_BYTES = 1
    CONST_SIZE_BYTES = 2
    LOCAL_SIZE_BYTES = 3
    NUM_REGS = 4
    PTX_VERSION = 5
    BINARY_VERSION = 6
    MAX_DYNAMIC_SHARED_SIZE_BYTES = 8


@dataclass(frozen=True)
class Profile:
    """What a device profile tells about the emulated GPU (as cuDeviceGetAttribute would)."""
    name: str
    arch: str  # what nvcc compiles for, to get the kernels' registers
    attributes: dict
    total_memory: int


def _profile(name, arch, sms, threads_per_sm, shared_per_sm, shared_optin, blocks_per_sm,
             memory, memory_clock_khz, bus_bits, l2, clock_khz):
    a = device_attribute
    major, minor = int(arch[3:-1]), int(arch[-1])
    return Profile(name, arch, {
        a.MAX_THREADS_PER_BLOCK: 1024, a.MAX_BLOCK_DIM_X: 1024, a.MAX_BLOCK_DIM_Y: 1024,
        a.MAX_BLOCK_DIM_Z: 64, a.MAX_GRID_DIM_X: 2**31 - 1, a.MAX_GRID_DIM_Y: 65535,
        a.MAX_GRID_DIM_Z: 65535, a.MAX_SHARED_MEMORY_PER_BLOCK: 48 * 1024,
        a.TOTAL_CONSTANT_MEMORY: 64 * 1024, a.WARP_SIZE: 32, a.MAX_REGISTERS_PER_BLOCK: 65536,
        a.CLOCK_RATE: clock_khz, a.MULTIPROCESSOR_COUNT: sms, a.MEMORY_CLOCK_RATE: memory_clock_khz,
        a.GLOBAL_MEMORY_BUS_WIDTH: bus_bits, a.L2_CACHE_SIZE: l2,
        a.MAX_THREADS_PER_MULTIPROCESSOR: threads_per_sm, a.COMPUTE_CAPABILITY_MAJOR: major,
        a.COMPUTE_CAPABILITY_MINOR: minor, a.MAX_SHARED_MEMORY_PER_MULTIPROCESSOR: shared_per_sm,
        a.MAX_REGISTERS_PER_MULTIPROCESSOR: 65536, a.MAX_SHARED_MEMORY_PER_BLOCK_OPTIN: shared_optin,
        a.MAX_BLOCKS_PER_MULTIPROCESSOR: blocks_per_sm, a.RESERVED_SHARED_MEMORY_PER_BLOCK: 1024,
    }, memory)


PROFILES = {
    # an H100 SXM5 80GB: 132 SMs, 3.35 TB/s (2 x 2619 MHz x 5120 bits)
    "h100": _profile("NVIDIA H100 80GB HBM3 (emulated)", "sm_90", 132, 2048, 228 * 1024,
                     227 * 1024, 32, 80 * 2**30, 2_619_000, 5120, 50 * 2**20, 1_980_000),
    # a small sm_86 part with 2 SMs and 64 MiB: grid-stride loops iterate, big models do not fit
    "few-sms": _profile("2-SM sm_86 GPU with 64 MiB (emulated)", "sm_86", 2, 1536, 100 * 1024,
                        99 * 1024, 16, 64 * 2**20, 7_001_000, 128, 2 * 2**20, 1_500_000),
}


# ----------------------------------------------------------------------------
# settings (see cuda_emulator.configure)

POLICIES = {"in-order": 0, "random": 1}


@dataclass
class Settings:
    device: str
    schedule: str
    launches: int = 0  # under this schedule: a random one draws launch k's order from (seed, k)


settings = Settings(os.environ.get("CUDA_EMULATOR_DEVICE") or "h100",
                    os.environ.get("CUDA_EMULATOR_SCHEDULE") or "in-order")


def parse_schedule(schedule):
    """'in-order', 'random' or 'random:SEED' -> (policy number, seed)."""
    name, _, seed = schedule.partition(":")
    if name not in POLICIES or (seed and name != "random") or (seed and not seed.isdigit()):
        raise ValueError(f"unknown schedule {schedule!r}: in-order, random or random:SEED")
    return POLICIES[name], int(seed or 0)


def current_profile():
    if settings.device not in PROFILES:
        raise LogicError(f"unknown device profile {settings.device!r}: {', '.join(PROFILES)}")
    return PROFILES[settings.device]


# ----------------------------------------------------------------------------
# what the stand-in counts

class Counters:
    """Launches (in all and per kernel) and bytes copied host to device and back."""

    def __init__(self):
        self.reset()

    def reset(self):
        self.launches = 0
        self.launches_by_kernel = collections.Counter()
        self.htod_bytes = 0
        self.dtoh_bytes = 0

    def snapshot(self):
        return dict(launches=self.launches, htod_bytes=self.htod_bytes, dtoh_bytes=self.dtoh_bytes,
                    launches_by_kernel=dict(self.launches_by_kernel))


counters = Counters()
_lock = threading.Lock()  # one launch or copy at a time


# ----------------------------------------------------------------------------
# devices and contexts

def init(flags=0):
    del flags


class Device:
    def __init__(self, number=0):
        if number != 0:
            raise LogicError(f"cuDeviceGet failed: invalid device ordinal ({number})")

    @staticmethod
    def count():
        return 1

    def name(self):
        return current_profile().name

    def get_attribute(self, attribute):
        return current_profile().attributes[device_attribute(attribute)]

    def make_context(self, flags=0):
        del flags
        return Context()


class Context:
    @staticmethod
    def get_device():
        return Device(0)

    @staticmethod
    def synchronize():
        pass  # launches finish before they return


# ----------------------------------------------------------------------------
# memory

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                       ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_MAP_FAILED = ctypes.c_void_p(-1).value


def _words(address, nbytes):
    """The memory at address (4-byte aligned) as a uint32 array, nbytes // 4 long."""
    return np.ctypeslib.as_array((ctypes.c_uint32 * (nbytes // 4)).from_address(address))


class _Allocations:
    """The live allocations, found by address."""

    def __init__(self):
        self.starts, self.by_start, self.used, self.count = [], {}, 0, 0

    def add(self, allocation):
        bisect.insort(self.starts, allocation.data_start)
        self.by_start[allocation.data_start] = allocation
        self.used += allocation.size
        self.count += 1

    def remove(self, allocation):
        self.starts.remove(allocation.data_start)
        del self.by_start[allocation.data_start]
        self.used -= allocation.size

    def near(self, address):
        """The allocation whose mapping (guard pages included) holds address, or None."""
        i = bisect.bisect_right(self.starts, address + PAGE) - 1
        if i < 0:
            return None
        allocation = self.by_start[self.starts[i]]
        return allocation if allocation.data_start - PAGE <= address < allocation.data_end + PAGE else None

    def holding(self, address, nbytes):
        """The allocation that holds [address, address + nbytes), or None."""
        allocation = self.near(address)
        if allocation and allocation.ptr <= address and address + nbytes <= allocation.ptr + allocation.size:
            return allocation
        return None


_allocations = _Allocations()


class DeviceAllocation:
    """Device memory: int(allocation) is its address, for pointer arithmetic as in PyCUDA."""

    _base = None  # the mapping, until free()

    def __init__(self, nbytes, fill=True):
        if nbytes <= 0:
            raise LogicError("cuMemAlloc failed: invalid argument (size 0)")
        profile = current_profile()
        if _allocations.used + nbytes > profile.total_memory:
            raise MemoryError(f"cuMemAlloc failed: out of memory ({nbytes} bytes asked, "
                              f"{profile.total_memory - _allocations.used} of "
                              f"{profile.total_memory} free on {profile.name})")
        data = -(-(nbytes + ALIGNMENT) // PAGE) * PAGE
        mapped = data + 2 * PAGE
        base = _libc.mmap(None, mapped, mmap.PROT_READ | mmap.PROT_WRITE,
                          mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0)
        if base in (None, _MAP_FAILED):
            raise MemoryError(f"cuMemAlloc failed: out of memory ({nbytes} bytes asked)")
        _libc.mprotect(base, PAGE, PROT_NONE)
        _libc.mprotect(base + PAGE + data, PAGE, PROT_NONE)
        self._base, self._mapped = base, mapped
        self.data_start, self.data_end = base + PAGE, base + PAGE + data
        self.ptr = (self.data_end - nbytes) // ALIGNMENT * ALIGNMENT
        self.size = nbytes
        self.number = _allocations.count + 1
        # each allocation's own canary: bytes copied from another's slack still show
        self.canary = CANARY ^ (self.number * 0x9E37 & 0x3FFFFF)
        words = _words(self.data_start, data)
        first, end = (self.ptr - self.data_start) // 4, (self.ptr + nbytes - self.data_start) // 4
        words[:first] = words[end:] = self.canary  # (the word the end shares with the slack too)
        if fill:
            words[first:end] = FRESH
        self.canaries = ((self.data_start, self.ptr - self.data_start, self.canary),
                         (self.ptr + nbytes, self.data_end - self.ptr - nbytes, self.canary))
        _allocations.add(self)

    def __int__(self):
        return self.ptr

    __index__ = __int__

    def free(self, _registry=_allocations, _munmap=_libc.munmap):
        # (the defaults keep what it needs alive until the interpreter's last collection)
        if self._base is not None:
            _registry.remove(self)
            _munmap(self._base, self._mapped)
            self._base = None

    def __del__(self):
        self.free()

    def describe(self):
        return f"allocation #{self.number} ({self.size} bytes at 0x{self.ptr:x})"


def describe_address(address, write):
    """Where an address that faulted lies, relative to the allocations."""
    verb = "writing" if write else "reading"
    allocation = _allocations.near(address)
    if allocation is None:
        return f"{verb} 0x{address:x}, which is in no device allocation"
    if address >= allocation.ptr + allocation.size:
        return (f"{verb} 0x{address:x}, {address - allocation.ptr - allocation.size} bytes past the "
                f"end of {allocation.describe()}")
    return (f"{verb} 0x{address:x}, {allocation.ptr - address} bytes before the start of "
            f"{allocation.describe()}")


def mem_alloc(nbytes):
    return DeviceAllocation(int(nbytes))


def _address(device_pointer, nbytes, what):
    address = int(device_pointer)
    if _allocations.holding(address, nbytes) is None:
        raise LogicError(f"{what} failed: invalid argument ({nbytes} bytes at 0x{address:x} are "
                         "not inside one device allocation)")
    return address


def _contiguous(buffer, what, writable=False):
    view = memoryview(buffer)
    if not view.c_contiguous or (writable and view.readonly):
        raise LogicError(f"{what}: the host buffer must be {'writable and ' if writable else ''}"
                         "contiguous")
    return view


def memcpy_htod(dest, src):
    view = _contiguous(src, "memcpy_htod")
    with _lock:
        address = _address(dest, view.nbytes, "cuMemcpyHtoD")
        ctypes.memmove(address, np.frombuffer(view.cast("B"), dtype=np.uint8).ctypes.data, view.nbytes)
        counters.htod_bytes += view.nbytes


def memcpy_dtoh(dest, src):
    view = _contiguous(dest, "memcpy_dtoh", writable=True)
    with _lock:
        address = _address(src, view.nbytes, "cuMemcpyDtoH")
        ctypes.memmove(np.frombuffer(view.cast("B"), dtype=np.uint8).ctypes.data, address, view.nbytes)
        counters.dtoh_bytes += view.nbytes


def to_device(array):
    view = _contiguous(array, "to_device")
    allocation = DeviceAllocation(view.nbytes, fill=False)
    memcpy_htod(allocation, array)
    return allocation


def memset_d32(dest, data, count):
    with _lock:
        address = _address(dest, 4 * count, "cuMemsetD32")
        if address % 4:
            raise LogicError("cuMemsetD32 failed: invalid argument (address not 4-byte aligned)")
        _words(address, 4 * count)[:] = data


# ----------------------------------------------------------------------------
# kernels

# cuemu_launch's results besides 0 and 1 (a launch error with its message)
_FAULT_OUTSIDE_ALLOCATION, _CANARY_OVERWRITTEN = 2, 3
_KINDS = {0: "integer", 1: "floating-point", 2: "pointer", 3: "struct"}
_FORMAT_KIND = dict.fromkeys("bBhHiIlLqQnN", 0) | {"f": 1, "d": 1, "P": 2}


class Function:
    """A kernel of a SourceModule: attributes, prepare() and prepared_call().

    ptxas: nvcc's registers, static shared memory and stack for it, or None without nvcc.
    """

    def __init__(self, name, library, entry, params, ptxas, module_static_shared):
        self.name = name
        self._library, self._entry, self._params = library, entry, params
        self._format = None
        profile = current_profile().attributes
        registers = ptxas["registers"] if ptxas else REGISTERS_WITHOUT_NVCC
        static_shared = ptxas["shared"] if ptxas else module_static_shared
        per_warp = -(-registers * 32 // 256) * 256  # registers are allocated per warp, by 256
        cc = 10 * profile[device_attribute.COMPUTE_CAPABILITY_MAJOR] + profile[
            device_attribute.COMPUTE_CAPABILITY_MINOR]
        fa = function_attribute
        self._attributes = {
            fa.MAX_THREADS_PER_BLOCK: min(profile[device_attribute.MAX_THREADS_PER_BLOCK],
                                          profile[device_attribute.MAX_REGISTERS_PER_BLOCK]
                                          // max(per_warp, 1) * 32),
            fa.SHARED_SIZE_BYTES: static_shared,
            fa.CONST_SIZE_BYTES: 0,
            fa.LOCAL_SIZE_BYTES: ptxas["stack"] if ptxas else 0,
            fa.NUM_REGS: registers,
            fa.PTX_VERSION: cc,
            fa.BINARY_VERSION: cc,
            fa.MAX_DYNAMIC_SHARED_SIZE_BYTES: profile[device_attribute.MAX_SHARED_MEMORY_PER_BLOCK]
                                              - static_shared,
        }

    def get_attribute(self, attribute):
        return self._attributes[function_attribute(attribute)]

    def set_attribute(self, attribute, value):
        attribute = function_attribute(attribute)
        profile = current_profile().attributes
        limit = (profile[device_attribute.MAX_SHARED_MEMORY_PER_BLOCK_OPTIN]
                 - self._attributes[function_attribute.SHARED_SIZE_BYTES])
        if attribute != function_attribute.MAX_DYNAMIC_SHARED_SIZE_BYTES or not 0 <= value <= limit:
            raise LogicError(f"cuFuncSetAttribute failed: invalid value ({attribute.name} = {value})")
        self._attributes[attribute] = value

    def prepare(self, arg_types):
        """arg_types: a struct format string ('P' pointer, 'i' int, 'f' float, ...), as in PyCUDA.

        Unlike PyCUDA, it must match the kernel's parameters in kind and size.
        """
        fmt = "".join(arg_types)
        wanted = [(_KINDS[kind], size) for kind, size in self._params]
        given = [(_KINDS.get(_FORMAT_KIND.get(c), "unknown"), struct.calcsize("@" + c)) for c in fmt]
        if given != wanted:
            raise LogicError(f"{self.name}: prepare({fmt!r}) does not match its parameters: "
                             f"{len(wanted)} of kind and size {wanted}")
        self._format = struct.Struct("@" + fmt)
        self._pointer_args = [i for i, c in enumerate(fmt) if c == "P"]
        return self

    def prepared_call(self, grid, block, *args, shared_size=0):
        if self._format is None:
            raise LogicError(f"{self.name}: prepared_call() before prepare()")
        grid = tuple(grid) + (1,) * (3 - len(grid))
        block = tuple(block) + (1,) * (3 - len(block))
        self._check_shape(grid, block, shared_size)
        try:
            params = self._format.pack(*args)
        except struct.error as e:
            raise LogicError(f"{self.name}: bad arguments ({e})") from None
        canaries = []
        for i in self._pointer_args:  # (address, length, word) of the slack bytes to check
            address = args[i] if isinstance(args[i], int) else int(args[i])
            if address == 0:
                continue
            allocation = _allocations.near(address)
            if allocation is None or not allocation.ptr <= address <= allocation.ptr + allocation.size:
                raise LaunchError(f"{self.name}: argument {i} (0x{address:x}) is not a device "
                                  "address")
            for triple in allocation.canaries:
                if triple not in canaries:
                    canaries.append(triple)
        flat = (ctypes.c_uint64 * (3 * len(canaries) or 1))(*(v for triple in canaries for v in triple))
        message = ctypes.create_string_buffer(2048)
        fault, fault_write = ctypes.c_uint64(), ctypes.c_int()
        policy, seed = parse_schedule(settings.schedule)
        with _lock:
            counters.launches += 1
            counters.launches_by_kernel[self.name] += 1
            settings.launches += 1
            result = self._library.cuemu_launch(
                self._entry, params, *grid, *block, shared_size, policy,
                seed * 0x9E3779B97F4A7C15 + settings.launches & 0xFFFFFFFFFFFFFFFF,
                flat, len(canaries), message, len(message), ctypes.byref(fault),
                ctypes.byref(fault_write))
        text = message.value.decode(errors="replace")
        if result == _FAULT_OUTSIDE_ALLOCATION:
            text += describe_address(fault.value, fault_write.value)
        elif result == _CANARY_OVERWRITTEN:
            text = "an out-of-bounds write (found after the launch): " + describe_address(fault.value, True)
        if result:
            raise LaunchError(f"kernel {self.name}: {text}")

    def _check_shape(self, grid, block, shared_size):
        profile = current_profile().attributes
        a = device_attribute
        limits = (a.MAX_BLOCK_DIM_X, a.MAX_BLOCK_DIM_Y, a.MAX_BLOCK_DIM_Z)
        grid_limits = (a.MAX_GRID_DIM_X, a.MAX_GRID_DIM_Y, a.MAX_GRID_DIM_Z)
        threads = block[0] * block[1] * block[2]
        if (len(block) != 3 or len(grid) != 3
                or not all(1 <= b <= profile[limit] for b, limit in zip(block, limits))
                or not all(1 <= g <= profile[limit] for g, limit in zip(grid, grid_limits))):
            raise LaunchError(f"{self.name}: invalid launch shape: grid {grid}, block {block}")
        if threads > self._attributes[function_attribute.MAX_THREADS_PER_BLOCK]:
            raise LaunchError(f"{self.name}: {threads} threads per block, more than its registers "
                              f"allow ({self._attributes[function_attribute.MAX_THREADS_PER_BLOCK]})")
        if not 0 <= shared_size <= self._attributes[function_attribute.MAX_DYNAMIC_SHARED_SIZE_BYTES]:
            raise LaunchError(f"{self.name}: {shared_size} bytes of dynamic shared memory, more "
                              "than its MAX_DYNAMIC_SHARED_SIZE_BYTES "
                              f"({self._attributes[function_attribute.MAX_DYNAMIC_SHARED_SIZE_BYTES]})")

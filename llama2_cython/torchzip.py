"""Reads the zip checkpoints of torch.save (PyTorch 1.6 and later) with NumPy only, a tensor at a
time, and without running anything the pickle asks for.

A checkpoint is a zip archive whose entries all lie under one folder (torch names it after the
file, e.g. "consolidated.00/"):
  data.pkl     the pickled object (protocol 2); each tensor in it is a call of
               torch._utils._rebuild_tensor_v2(storage, storage_offset, size, stride, ...) and each
               storage a persistent id ('storage', torch.BFloat16Storage, key, location, numel),
               numel counted in elements (torch 2.x still names the legacy storage classes
               there, not torch.UntypedStorage and a dtype, for a tensor's storage)
  data/<key>   the storage's bytes, stored uncompressed (torch pads the local headers so that
               the data start at multiples of 64 bytes)
  byteorder    "little" (absent in files of older torch, which wrote little-endian ones)
  version, .format_version, .storage_alignment, .data/serialization_id: not needed here

The pickle is read by an unpickler that knows only the globals a state_dict of float tensors
needs, each mapped to a function or a marker of this module; any other global (os.system, builtins.eval, ...)
is refused, naming it, before anything is called. A tensor comes back as a Tensor: its shape and
dtype, and methods that read it (bfloat16, float16, float32 or float64) into float32, exactly:
bfloat16 is the top half of a float32, float16 widens exactly, float64 rounds to nearest.

    with TorchCheckpoint("consolidated.00.pth") as ckpt:
        for name, tensor in ckpt.state_dict().items():
            array = tensor.numpy()            # float32, C-contiguous; nothing is read before

Bad input (not a zip, no data.pkl, a storage missing or too short, a disallowed global, ...)
raises llama2_cython.LlamaError with one line that starts with the file's path; OSError is left
to the caller, which reports file errors as such.
"""
import errno
import io
import math
import os
import pickle
import pickletools
import struct
import zipfile

import numpy as np

from llama2_cython import LlamaError

# the storage classes torch.save names, by their legacy names: (dtype name, NumPy dtype of the
# stored bytes); bfloat16 is read as its 16 bits and widened by hand
STORAGE_DTYPES = {
    "BFloat16Storage": ("bfloat16", np.dtype("<u2")),
    "HalfStorage": ("float16", np.dtype("<f2")),
    "FloatStorage": ("float32", np.dtype("<f4")),
    "DoubleStorage": ("float64", np.dtype("<f8")),
}
# the opcodes of pickles of dicts of tensors (protocols 2 to 4, as torch.save may write them);
# the globals they name are checked by the unpickler's find_class
PICKLE_OPCODES = frozenset("""
    PROTO FRAME STOP MARK POP POP_MARK DUP
    NONE NEWTRUE NEWFALSE INT BININT BININT1 BININT2 LONG LONG1 LONG4 FLOAT BINFLOAT
    STRING BINSTRING SHORT_BINSTRING UNICODE BINUNICODE SHORT_BINUNICODE BINUNICODE8
    EMPTY_TUPLE TUPLE TUPLE1 TUPLE2 TUPLE3 EMPTY_LIST LIST APPEND APPENDS
    EMPTY_DICT DICT SETITEM SETITEMS
    PUT BINPUT LONG_BINPUT MEMOIZE GET BINGET LONG_BINGET
    GLOBAL STACK_GLOBAL REDUCE BUILD BINPERSID
""".split())
MAX_PICKLE_BYTES = 64 << 20  # a 70B shard's data.pkl is about 100 KB
MAX_DIMS = 64  # torch's own limit on a tensor's dimensions
MAX_SIZE = 2**48  # the largest size or stride taken (NumPy's shapes are int64)
CHUNK_BYTES = 32 << 20  # the most bytes read at once from a contiguous tensor
LOCAL_HEADER = struct.Struct("<IHHHHHIIIHH")  # a zip local file header's 30 bytes
LOCAL_HEADER_SIGNATURE = 0x04034B50


def _short(text, limit=80):
    """text on one short line (escapes for anything unprintable)."""
    text = repr(str(text))[1:-1]
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


# ---------------------------------------------------------------------------- what data.pkl builds

def _no_state(obj, state):
    """pickle's BUILD on one of this module's objects (it would set their attributes, a tensor's
    offset or a storage's size, past the checks): refused."""
    raise TypeError(f"BUILD on a {type(obj).__name__}")


class _StorageType:
    """What the unpickler gives for torch.BFloat16Storage etc.: a marker, not callable."""
    __slots__ = ("name",)

    def __init__(self, name):
        self.name = name

    def __setstate__(self, state):
        _no_state(self, state)


class Storage:
    """One storage: the data/<key> record, its element type and its number of elements."""
    __slots__ = ("checkpoint", "key", "dtype", "item", "numel", "offset")

    def __init__(self, checkpoint, key, dtype, item, numel, offset):
        self.checkpoint, self.key, self.dtype, self.item = checkpoint, key, dtype, item
        self.numel, self.offset = numel, offset  # offset: of its first byte in the file

    def __setstate__(self, state):
        _no_state(self, state)


class Tensor:
    """A tensor of a checkpoint, read only when asked: `numel` elements of storage `storage`
    from element `storage_offset` on, laid out by `shape` and `stride` (in elements)."""
    __slots__ = ("storage", "storage_offset", "shape", "stride")

    def __init__(self, storage, storage_offset, shape, stride):
        self.storage, self.storage_offset = storage, storage_offset
        self.shape, self.stride = shape, stride

    def __setstate__(self, state):
        _no_state(self, state)

    def __repr__(self):
        return f"Tensor(shape={self.shape}, dtype={self.dtype}, storage {self.storage.key!r})"

    @property
    def dtype(self):
        """The stored type's name: 'bfloat16', 'float16', 'float32' or 'float64'."""
        return self.storage.dtype

    @property
    def ndim(self):
        return len(self.shape)

    @property
    def numel(self):
        return math.prod(self.shape)

    def is_contiguous(self):
        """Whether the elements lie in C order with no gaps (torch's is_contiguous)."""
        expected = 1
        for size, stride in zip(reversed(self.shape), reversed(self.stride)):
            if size != 1 and stride != expected:
                return False
            expected *= size
        return True

    def numpy(self):
        """The tensor as a new float32 C-contiguous array."""
        out = np.empty(self.shape, np.float32)
        self.read_into(out)
        return out

    def read_into(self, out):
        """Reads the tensor into out, a float32 array (or view) of the same shape, a block of
        rows at a time when the tensor is contiguous: nothing bigger than CHUNK_BYTES is read at
        once besides out."""
        if out.shape != self.shape or out.dtype != np.float32:
            raise ValueError(f"read_into: out is {out.dtype} {out.shape}, the tensor {self.shape}")
        if self.numel == 0:
            return out
        checkpoint, storage = self.storage.checkpoint, self.storage
        item = storage.item
        start = storage.offset + self.storage_offset * item.itemsize
        if self.is_contiguous():
            if out.ndim == 0:
                _widen(checkpoint.read(start, item, 1).reshape(()), out)
                return out
            row = math.prod(self.shape[1:])
            rows = max(1, CHUNK_BYTES // max(1, row * item.itemsize))
            for r in range(0, self.shape[0], rows):
                block = out[r:r + rows]
                raw = checkpoint.read(start + r * row * item.itemsize, item, block.size)
                _widen(raw.reshape(block.shape), block)
                del raw  # before the next block's is allocated
        else:
            # a view with gaps or in another order: map the span it covers and let NumPy walk it
            span = 1 + sum((n - 1) * s for n, s in zip(self.shape, self.stride))
            mapped = checkpoint.map(start, item, span)
            view = np.lib.stride_tricks.as_strided(
                mapped, self.shape, [s * item.itemsize for s in self.stride], writeable=False)
            _widen(view, out)
            del view, mapped
        return out


def _widen(raw, out):
    """raw (stored dtype) into out (float32): bfloat16's 16 bits become the top of a float32."""
    if raw.dtype == np.dtype("<u2"):
        np.left_shift(raw, 16, out=out.view(np.uint32), dtype=np.uint32)
    else:
        np.copyto(out, raw, casting="same_kind")


class StateDict(dict):
    """What data.pkl's collections.OrderedDict() becomes: a dict (in order) that takes the one
    attribute torch's state_dict() pickles with it, _metadata (each module's version), as
    pickle's BUILD gives it; any other attribute is refused (it would shadow a dict method)."""

    def __setstate__(self, state):
        if not (isinstance(state, dict) and set(state) <= {"_metadata"}):
            raise TypeError("BUILD on an OrderedDict with other state than _metadata")
        self._metadata = state.get("_metadata")


def _storage_arg(checkpoint, storage, what):
    if not isinstance(storage, Storage):
        checkpoint.refuse(f"data.pkl: {what} is given {_short(type(storage).__name__)}, "
                          f"not a storage")
    return storage


def _rebuild(checkpoint, storage, storage_offset, size, stride, what):
    """A Tensor from _rebuild_tensor(_v2)'s arguments, all checked, its extent inside its
    storage."""
    storage = _storage_arg(checkpoint, storage, what)
    if not _is_int(storage_offset) or storage_offset < 0:
        checkpoint.refuse(f"data.pkl: {what} has storage offset {_short(storage_offset)}")
    for name, value in (("size", size), ("stride", stride)):
        if not (isinstance(value, tuple) and len(value) <= MAX_DIMS
                and all(_is_int(n) and 0 <= n <= MAX_SIZE for n in value)):
            checkpoint.refuse(f"data.pkl: {what} has {name} {_short(value)}, not a tuple of "
                              f"sizes")
    if len(size) != len(stride):
        checkpoint.refuse(f"data.pkl: {what} has size {size} but stride {stride}")
    if math.prod(size):
        last = storage_offset + sum((n - 1) * s for n, s in zip(size, stride))
        if last >= storage.numel:
            checkpoint.refuse(
                f"storage {_short(storage.key)} holds {storage.numel} elements, but a tensor of "
                f"size {list(size)}, stride {list(stride)} at offset {storage_offset} reaches "
                f"element {last} (a truncated or damaged checkpoint)")
    return Tensor(storage, storage_offset, size, stride)


class _Unpickler(pickle.Unpickler):
    """data.pkl's reader: globals only from ALLOWED, storages from the zip's records."""

    def __init__(self, file, checkpoint):
        super().__init__(file)
        self.checkpoint = checkpoint
        self.storages = {}
        ckpt = checkpoint

        def rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False,
                              backward_hooks=None, metadata=None, *rest):
            if rest or backward_hooks or metadata:  # hooks and metadata: empty in a state_dict
                ckpt.refuse("data.pkl: a tensor has backward hooks or metadata, which a "
                            "state_dict's tensors have not")
            return _rebuild(ckpt, storage, storage_offset, size, stride, "a tensor")

        def rebuild_tensor(storage, storage_offset, size, stride):
            return _rebuild(ckpt, storage, storage_offset, size, stride, "a tensor")

        def ordered_dict():
            return StateDict()  # pickle fills it with SETITEMS; a dict keeps the order too

        self.allowed = {
            ("collections", "OrderedDict"): ordered_dict,
            ("torch._utils", "_rebuild_tensor_v2"): rebuild_tensor_v2,
            ("torch._utils", "_rebuild_tensor"): rebuild_tensor,
        }
        for name in STORAGE_DTYPES:
            self.allowed["torch", name] = _StorageType(name)

    def find_class(self, module, name):
        found = self.allowed.get((module, name))
        if found is None:
            self.checkpoint.refuse(
                f"data.pkl asks for the global {_short(f'{module}.{name}')}, which a state_dict "
                f"of float tensors does not need (refused, not run)")
        return found

    def persistent_load(self, pid):
        ckpt = self.checkpoint
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            ckpt.refuse(f"data.pkl: persistent id {_short(pid)} is not a storage's")
        _, kind, key, location, numel = pid
        if not isinstance(kind, _StorageType):
            ckpt.refuse(f"data.pkl: storage {_short(key)} has type {_short(kind)}, not one of "
                        f"torch.{', torch.'.join(STORAGE_DTYPES)}")
        if not isinstance(key, str) or not isinstance(location, str) or not _is_int(numel) \
                or numel < 0:
            ckpt.refuse(f"data.pkl: persistent id {_short(pid)} is not a storage's")
        if key in self.storages:  # one storage, several tensors (views of it)
            storage = self.storages[key]
            if storage.dtype != STORAGE_DTYPES[kind.name][0] or storage.numel != numel:
                ckpt.refuse(f"data.pkl: storage {_short(key)} is given two types or sizes")
            return storage
        dtype, item = STORAGE_DTYPES[kind.name]
        offset, size = ckpt.record(f"data/{key}")
        if numel * item.itemsize > size:
            ckpt.refuse(f"storage {_short(key)} has {size} bytes in the zip, but data.pkl says "
                        f"it holds {numel} {dtype} values ({numel * item.itemsize} bytes): a "
                        f"truncated or damaged checkpoint")
        storage = self.storages[key] = Storage(ckpt, key, dtype, item, numel, offset)
        return storage


# ---------------------------------------------------------------------------- the checkpoint

class TorchCheckpoint:
    """An open torch.save zip checkpoint: `root` is its unpickled object (dicts, lists, numbers,
    strings and Tensors); state_dict() checks that it is a dict of tensors. Keeps the file open
    until close() (or the end of a with block); its tensors read from it."""

    def __init__(self, path):
        self.path = os.fspath(path)
        self._file = open(self.path, "rb")
        try:
            self._size = os.fstat(self._file.fileno()).st_size
            self._open()
        except BaseException:
            self.close()
            raise

    def refuse(self, message):
        raise LlamaError(f"{self.path}: {message}")

    def _open(self):
        try:
            archive = zipfile.ZipFile(self._file)  # leaves the file open when closed
        except OSError as e:
            if e.errno != errno.EINVAL:  # a seek to where no byte can be: odd offsets
                raise
            self.refuse(f"not a zip file, so not a checkpoint of torch.save (1.6 or later) "
                        f"({_short(e)})")
        except Exception as e:  # BadZipFile mostly; zipfile fails in other ways on odd bytes
            self.refuse(f"not a zip file, so not a checkpoint of torch.save (1.6 or later), or "
                        f"truncated ({type(e).__name__}: {_short(e)})")
        with archive:
            infos = archive.infolist()
            pickles = [info for info in infos if info.filename.endswith("/data.pkl")
                       and info.filename.count("/") == 1]
            if len(pickles) != 1:
                self.refuse("no data.pkl in the zip, not a torch.save checkpoint" if not pickles
                            else "several data.pkl in the zip, not a torch.save checkpoint")
            self._prefix = pickles[0].filename[:-len("data.pkl")]
            self._records = {info.filename: info for info in infos}
            order = self._records.get(self._prefix + "byteorder")
            if order is not None:
                text = self._read_small(archive, order, 16)
                if text != b"little":
                    self.refuse(f"byteorder is {_short(text.decode('latin-1'))}, not little "
                                f"(big-endian checkpoints are not read)")
            data = self._read_small(archive, pickles[0], MAX_PICKLE_BYTES)
        self._check_opcodes(data)
        unpickler = _Unpickler(io.BytesIO(data), self)
        try:
            self.root = unpickler.load()
        except (LlamaError, OSError):
            raise
        except Exception as e:  # a damaged or foreign pickle fails in many ways
            self.refuse(f"data.pkl is not a pickled state_dict of tensors "
                        f"({type(e).__name__}: {_short(e)})")
        self.storages = unpickler.storages

    def _check_opcodes(self, data):
        """Refuses a data.pkl with an opcode that no pickled state_dict has (byte arrays, out
        of band buffers, extension codes, INST/OBJ class calls, ...), scanned before anything
        is unpickled: only dicts, lists, tuples, numbers, strings, the allowed globals and
        storages are built."""
        try:
            for opcode, _, position in pickletools.genops(data):
                if opcode.name not in PICKLE_OPCODES:
                    self.refuse(f"data.pkl has the pickle opcode {opcode.name} at byte "
                                f"{position}, which a state_dict of tensors does not use")
        except ValueError as e:  # an unknown opcode, an argument cut short
            self.refuse(f"data.pkl is not a pickle ({_short(e)})")

    def _read_small(self, archive, info, limit):
        """A small record's bytes (data.pkl, byteorder), compressed or not."""
        if info.file_size > limit:
            self.refuse(f"{_short(info.filename)} has {info.file_size} bytes, more than the "
                        f"{limit} expected")
        try:
            with archive.open(info) as fh:
                return fh.read(limit + 1)[:limit]
        except OSError as e:
            if e.errno != errno.EINVAL:  # EINVAL: a seek before the file's start
                raise
            self.refuse(f"cannot read {_short(info.filename)} (a damaged zip: {_short(e)})")
        except Exception as e:  # a bad CRC, an encrypted or oddly compressed record, ...
            self.refuse(f"cannot read {_short(info.filename)} ({type(e).__name__}: {_short(e)})")

    def record(self, name):
        """(offset of the first data byte in the file, size) of the uncompressed record
        prefix/name, its local header checked."""
        info = self._records.get(self._prefix + name)
        if info is None:
            self.refuse(f"data.pkl names storage {_short(name)}, which is not in the zip "
                        f"(a damaged checkpoint)")
        if info.compress_type != zipfile.ZIP_STORED or info.flag_bits & 1:
            self.refuse(f"{_short(info.filename)} is compressed or encrypted (method "
                        f"{info.compress_type}); torch.save stores storages as they are")
        if not 0 <= info.header_offset < self._size:
            self.refuse(f"{_short(info.filename)}: its local header's offset "
                        f"{info.header_offset} is outside the file (a damaged zip)")
        self._file.seek(info.header_offset)
        header = self._file.read(LOCAL_HEADER.size)
        if len(header) != LOCAL_HEADER.size or \
                LOCAL_HEADER.unpack(header)[0] != LOCAL_HEADER_SIGNATURE:
            self.refuse(f"{_short(info.filename)}: no zip local header at its offset "
                        f"{info.header_offset} (a damaged zip)")
        *_, name_length, extra_length = LOCAL_HEADER.unpack(header)
        start = info.header_offset + LOCAL_HEADER.size + name_length + extra_length
        if info.compress_size != info.file_size or start + info.file_size > self._size:
            self.refuse(f"{_short(info.filename)}: its {info.file_size} bytes at offset {start} "
                        f"are not all in the file's {self._size} (truncated?)")
        return start, info.file_size

    def read(self, offset, dtype, count):
        """count values of dtype at offset of the file, as a new array."""
        if self._file is None:
            raise ValueError(f"{self.path}: the checkpoint is closed")
        out = np.empty(count, dtype)
        view = memoryview(out).cast("B")
        self._file.seek(offset)
        done = 0
        while done < len(view):
            n = self._file.readinto(view[done:])
            if not n:
                self.refuse(f"ends at byte {offset + done}, inside a tensor at {offset} "
                            f"(the file shrank while open?)")
            done += n
        return out

    def map(self, offset, dtype, count):
        """count values of dtype at offset of the file, memory-mapped read-only."""
        if self._file is None:
            raise ValueError(f"{self.path}: the checkpoint is closed")
        if offset + count * dtype.itemsize > os.fstat(self._file.fileno()).st_size:
            self.refuse(f"ends before byte {offset + count * dtype.itemsize}, inside a tensor "
                        f"(the file shrank while open?)")
        return np.memmap(self._file, dtype, "r", offset, (count,))

    def state_dict(self):
        """root as {name: Tensor}, or a one-line refusal when it is anything else."""
        if not isinstance(self.root, dict):
            self.refuse(f"holds a {type(self.root).__name__}, not a state_dict (a dict of "
                        f"tensors)")
        for name, value in self.root.items():
            if not isinstance(name, str) or not isinstance(value, Tensor):
                self.refuse(f"entry {_short(name)} of the state_dict is a "
                            f"{type(value).__name__}, not a tensor")
        return self.root

    def close(self):
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def load(path):
    """TorchCheckpoint(path): use it in a with block, or close() it."""
    return TorchCheckpoint(path)

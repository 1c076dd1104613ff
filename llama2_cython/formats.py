"""llama2.c's model file formats, written once for run, runq, run_cuda and export.py: the header
layouts, the rules a header must follow, and the number of bytes each format gives a config.

  v0 (legacy, run.c): 7 int32 config values (vocab_size negated when the classifier is separate),
     then fp32 weights and two RoPE tables of seq_len x head_size/2 that run.c skips.
  v1 (fp32): a 256-byte header: uint32 magic "ak42", int32 version 1, the 7 int32 values, a
     uint8 shared-classifier flag; then fp32 weights (norms first, no RoPE tables).
  v2 (Q8_0, runq.c): the v1 header with version 2 and an int32 group_size after the flag; fp32
     norms, then each matrix as int8 values followed by one fp32 scale per group.
export.py's docstring lists the tensors of each format in order.
"""
import mmap
import numbers
import os
import sys
from dataclasses import dataclass

from . import LlamaError

MAGIC = 0x616B3432  # "ak42" as a little-endian uint32
HEADER_SIZE = 256  # v1 and v2
V0_HEADER_SIZE = 28  # 7 int32
CONFIG_FIELDS = ("dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "seq_len")
MAX_SEQ_LEN = 1 << 20  # the longest context a header may ask for (Llama 2 and 3 use 4096, 8192)
MAX_GROUP_SIZE = 1 << 17  # 2^17 products of at most 127 * 128 stay within a group's int32 sum


@dataclass(frozen=True)
class Header:
    """What a model file's header says."""
    version: int  # 0, 1 or 2
    config: dict  # CONFIG_FIELDS -> int (vocab_size positive)
    shared_classifier: bool  # the classifier is the token embedding table
    group_size: int = 0  # v2 only

    @property
    def size(self):
        """Bytes of header before the weights."""
        return V0_HEADER_SIZE if self.version == 0 else HEADER_SIZE

    def file_size(self):
        """The size in bytes of a file with this header."""
        return self.size + weights_nbytes(self)

    def describe(self):
        text = ", ".join(f"{k}={v}" for k, v in self.config.items())
        return text + (f", group_size={self.group_size}" if self.version == 2 else "")


def _ints(head, offset, count):
    return [int.from_bytes(head[offset + 4 * i:offset + 4 * i + 4], "little", signed=True)
            for i in range(count)]


def parse_header(head, path):
    """The Header of a file that starts with the bytes head (at least 256 of them, or the whole
    file): v1/v2 when it starts with the magic number, else v0. Checks nothing but the length."""
    if int.from_bytes(head[:4], "little") == MAGIC and len(head) >= 8:
        version = _ints(head, 4, 1)[0]
        if version not in (1, 2):
            raise LlamaError(f"{path}: unknown llama2.c file version {version} (1 and 2 exist)")
        if len(head) < HEADER_SIZE:
            raise LlamaError(f"{path}: file is {len(head)} bytes, too small for a v{version} header")
        config = dict(zip(CONFIG_FIELDS, _ints(head, 8, 7)))
        group_size = _ints(head, 37, 1)[0] if version == 2 else 0
        return Header(version, config, head[36] != 0, group_size)
    if len(head) < V0_HEADER_SIZE:
        raise LlamaError(f"{path}: file is {len(head)} bytes, too small for a model header")
    config = dict(zip(CONFIG_FIELDS, _ints(head, 0, 7)))
    # negative vocab size is hacky way of signaling unshared weights. bit yikes. (run.c)
    shared = config["vocab_size"] > 0
    config["vocab_size"] = abs(config["vocab_size"])
    return Header(0, config, shared)


def check_config(config, where):
    """Refuses a config whose numbers cannot describe a model that run.c can run: one line that
    starts with where (a file's "PATH: bad header", a config.json's path) and names the field."""
    for name in CONFIG_FIELDS:
        value = config[name]
        if not isinstance(value, numbers.Integral) or isinstance(value, bool):
            raise LlamaError(f"{where}: {name} = {value!r} is not an integer")
        if value <= 0:
            raise LlamaError(f"{where}: {name} = {value} (must be > 0)")
        if value >= 2**31:
            raise LlamaError(f"{where}: {name} = {value} does not fit an int32")
    if config["dim"] % config["n_heads"]:
        raise LlamaError(f"{where}: n_heads = {config['n_heads']} does not divide "
                         f"dim = {config['dim']}")
    if config["n_heads"] % config["n_kv_heads"]:
        raise LlamaError(f"{where}: n_kv_heads = {config['n_kv_heads']} does not divide "
                         f"n_heads = {config['n_heads']}")
    head_size = config["dim"] // config["n_heads"]
    if head_size % 2:
        raise LlamaError(f"{where}: head size {head_size} is odd (RoPE rotates pairs)")
    # v1/v2 files hold no table of seq_len rows: the file size does not bound it, so a limit does
    if config["seq_len"] > MAX_SEQ_LEN:
        raise LlamaError(f"{where}: seq_len = {config['seq_len']} is over the limit of {MAX_SEQ_LEN}")


def check_kv_cache_fits(config, where):
    """Refuses, before anything is allocated, a model whose KV cache is larger than this machine's
    memory (a header that lies about seq_len or n_layers would make a giant allocation)."""
    head_size = config["dim"] // config["n_heads"]
    kv_cache = 2 * 4 * config["n_layers"] * config["seq_len"] * config["n_kv_heads"] * head_size
    if kv_cache > physical_memory():
        raise LlamaError(f"{where}: seq_len = {config['seq_len']} needs a {kv_cache / 2**30:.1f} "
                         f"GiB KV cache over its {config['n_layers']} layers, more than this "
                         f"machine's memory")


def quantized_tensors(config, shared_classifier):
    """(name, count, rows, cols) of the matrices that v2 quantizes, in file order."""
    c = config
    L, dim, hidden = c["n_layers"], c["dim"], c["hidden_dim"]
    kv_dim = c["n_kv_heads"] * (dim // c["n_heads"])
    tensors = [("token_embedding_table", 1, c["vocab_size"], dim),
               ("wq", L, dim, dim), ("wk", L, kv_dim, dim), ("wv", L, kv_dim, dim), ("wo", L, dim, dim),
               ("w1", L, hidden, dim), ("w2", L, dim, hidden), ("w3", L, hidden, dim)]
    if not shared_classifier:
        tensors.append(("wcls", 1, c["vocab_size"], dim))
    return tensors


def check_group_size(config, group_size, shared_classifier, where):
    """Refuses a group size that does not cut every quantized tensor into whole groups. (Rows
    need not be whole groups: runq.pyx's matmul handles groups that straddle rows, runq.c's
    does not.)"""
    if group_size <= 0:
        raise LlamaError(f"{where}: group_size = {group_size} (must be > 0)")
    if group_size > MAX_GROUP_SIZE:
        raise LlamaError(f"{where}: group_size = {group_size} is too large (over "
                         f"{MAX_GROUP_SIZE} int8 products could overflow a group's int32 sum)")
    for name, _, rows, cols in quantized_tensors(config, shared_classifier):
        # runq.c would floor the number of scales and read every later tensor from the wrong place
        if rows * cols % group_size:
            raise LlamaError(f"{where}: group_size = {group_size} does not divide the "
                             f"{rows}x{cols} = {rows * cols} values of {name}")
        # the scales follow the int8 values: keep them where a float may be read
        if rows * cols % 4:
            raise LlamaError(f"{where}: the {rows}x{cols} int8 values of {name} "
                             f"leave its float32 scales misaligned")


def check_header(header, path):
    """Refuses a header whose numbers do not describe a model; the line names path and the field."""
    check_config(header.config, f"{path}: bad header")
    if header.version == 2:
        check_group_size(header.config, header.group_size, header.shared_classifier,
                         f"{path}: bad header")


def weights_nbytes(header):
    """Bytes of weights after the header (Python ints: no overflow)."""
    c = header.config
    norms = 2 * c["n_layers"] * c["dim"] + c["dim"]  # rms_att, rms_ffn, rms_final
    matrices = quantized_tensors(c, header.shared_classifier)
    if header.version == 2:  # int8 values and one fp32 scale per group
        return 4 * norms + sum(n * (r * k + 4 * (r * k // header.group_size)) for _, n, r, k in matrices)
    floats = norms + sum(n * r * k for _, n, r, k in matrices)
    if header.version == 0:  # the legacy freq_cis tables
        floats += 2 * c["seq_len"] * (c["dim"] // c["n_heads"] // 2)
    return 4 * floats


def physical_memory():
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 1 << 40


def available_memory():
    """Bytes that can be allocated without pushing anything out to swap or the OOM killer:
    Linux's MemAvailable (free memory plus the page cache and whatever else it can reclaim), at
    most physical_memory(); elsewhere physical_memory()."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return min(int(line.split()[1]) * 1024, physical_memory())
    except (OSError, ValueError, IndexError):
        pass
    return physical_memory()


def check_file_size(header, file_size, path):
    if file_size != header.file_size():
        raise LlamaError(f"{path}: file is {file_size} bytes but its v{header.version} header "
                         f"({header.describe()}) needs {header.file_size()}")


def map_model(checkpoint, versions, prog, populate=True):
    """(Header, read-only mmap) of a model file in one of the versions that prog reads. Every
    size is checked against the file before the C code makes a pointer into it (run.c and runq.c
    trust the header). populate: map every page now (Linux's MAP_POPULATE), unless the file is
    larger than the machine's memory: then it is mapped as it is read, and a warning on stderr
    says that every token reads it from disk."""
    path = os.fsdecode(checkpoint)
    try:
        f = open(checkpoint, "rb")
    except OSError as e:
        raise LlamaError(f"couldn't open file {path}: {e.strerror}") from None
    with f:
        file_size = os.fstat(f.fileno()).st_size
        head = f.read(HEADER_SIZE)
        header = parse_header(head, path)
        if header.version not in versions:
            raise LlamaError(_wrong_version(header, head, file_size, path))
        check_header(header, path)
        check_file_size(header, file_size, path)
        check_kv_cache_fits(header.config, f"{path}: bad header")
        memory = physical_memory()
        if file_size > memory:
            # it runs (the page cache keeps what fits), at the disk's pace
            print(f"{prog}: warning: {path} is {file_size / 1e9:.1f} GB, more than this machine's "
                  f"{memory / 1e9:.1f} GB of memory: every token will be read from disk",
                  file=sys.stderr, flush=True)
            populate = False
        try:
            # MAP_POPULATE (Linux): the pages are mapped now, in one go, instead of one fault at a
            # time during the first token or prompt (every weight is read for each token anyway)
            flags = mmap.MAP_SHARED | (getattr(mmap, "MAP_POPULATE", 0) if populate else 0)
            return header, mmap.mmap(f.fileno(), 0, flags=flags, prot=mmap.PROT_READ)
        except (OSError, ValueError) as e:
            raise LlamaError(f"couldn't map {path} ({file_size} bytes) into memory: "
                             f"{getattr(e, 'strerror', None) or e}") from None


def _wrong_version(header, head, file_size, path):
    # run.c reads anything without the magic number as v0; runq.c says "Bad magic number" to a
    # v0 file and "Bad version 1" to a v1 file: name the program that reads the file instead
    if header.version == 2:
        return f"{path}: is a version 2 (int8 Q8_0) file: run it with runq"
    if header.version == 0:
        try:
            check_header(header, path)
            check_file_size(header, file_size, path)
        except LlamaError:
            magic = int.from_bytes(head[:4], "little")
            return (f"{path}: bad magic number 0x{magic:08x} (a v2 file starts with "
                    f"0x{MAGIC:08x}, \"ak42\")")
    return (f"{path}: is a version {header.version} (fp32) file: run it with run, or convert it "
            f"for runq with export.py --version 2")

"""llama2.c's model file formats, written once for run, runq, run_cuda and export.py: the header
layouts, the rules a header must follow, and the number of bytes each format gives a config.

  v0 (legacy, run.c): 7 int32 config values (vocab_size negated when the classifier is separate),
     then fp32 weights and two RoPE tables of seq_len x head_size/2 that run.c skips.
  v1 (fp32): a 256-byte header: uint32 magic "ak42", int32 version 1, the 7 int32 values, a
     uint8 shared-classifier flag; then fp32 weights (norms first, no RoPE tables).
  v2 (Q8_0, runq.c): the v1 header with version 2 and an int32 group_size after the flag; fp32
     norms, then each matrix as int8 values followed by one fp32 scale per group.
  v3 (not in llama2.c): a model that run.c's constants would compute wrongly (another RoPE base
     or scaling, another RMSNorm epsilon: Code Llama, Llama 3, Hugging Face configs). The v2
     header with version 3, group_size 0 for v1's fp32 tensors or > 0 for v2's Q8_0 ones, and at
     byte 48 (all little-endian): float32 rope_theta, float32 norm_eps, int32 rope_scaling (0
     none, 1 linear, 2 llama3), float32 rope_factor, float32 rope_low_freq_factor, float32
     rope_high_freq_factor, int32 rope_original_max_position, and at byte 76 int32 layout: 0 for
     v2's rows, 1 for Q8_0 matrices packed for runq's AVX-512 VNNI kernel (below); every other
     byte of the 256 is 0, and a reader refuses a file where one is not (a field it does not
     know), so a reader without the layout field refuses a packed file rather than misread it.
     upstream's run.c and runq.c refuse it (runq.c: "Bad version 3"; run.c reads no magic number
     at all, and none of its files start with one), where a v1 or v2 file would be read with the
     wrong constants without a word. export.py writes v3 only for such models: a Llama 2 model
     is always written in the formats upstream reads, byte for byte, unless asked for layout 1.
  layout 1 (v3 with group_size 32 or 64 dividing dim and hidden_dim; export.py --packed): the
     norms and the token embedding table as in v2 (rows: one is read per token), then zero bytes
     up to a multiple of 64 from the file's start, then wq, wk, wv, wo, w1, w2, w3 (each layer's)
     and wcls (always: the embedding table packed too when the classifier is shared), each as
     q8matmul.h's packed layout: its blocks of 16 rows of int8 values (w + 128, transposed in
     4-byte lanes; rows and columns padded to 16 and 64), then its blocks' scales. runq maps them
     and multiplies them where they lie: no copy, so processes share the page cache.
export.py's docstring lists the tensors of each format in order.
"""
import array
import math
import mmap
import numbers
import os
import struct
import sys
from dataclasses import dataclass

from . import LlamaError

MAGIC = 0x616B3432  # "ak42" as a little-endian uint32
HEADER_SIZE = 256  # v1 and v2
V0_HEADER_SIZE = 28  # 7 int32
CONFIG_FIELDS = ("dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "seq_len")
MAX_SEQ_LEN = 1 << 20  # the longest context a header may ask for (Llama 2 and 3 use 4096, 8192)
MAX_GROUP_SIZE = 1 << 17  # 2^17 products of at most 127 * 128 stay within a group's int32 sum


def float32(value):
    """value rounded to the nearest float32, as a Python float."""
    return array.array("f", [value])[0]


# what run.c computes with: RoPE base 10000 (powf(10000.0f, ...)), RMSNorm epsilon 1e-5f
ROPE_THETA = 10000.0
NORM_EPS = float32(1e-5)
ROPE_SCALINGS = ("none", "linear", "llama3")  # v3's rope_scaling, by its number
V3_PARAMS = struct.Struct("<ffifffi")  # rope_theta .. rope_original_max_position, at byte 48
V3_PARAMS_OFFSET = 48
LAYOUTS = ("rows", "packed")  # v3's layout, by its number
V3_LAYOUT = struct.Struct("<i")
V3_LAYOUT_OFFSET = V3_PARAMS_OFFSET + V3_PARAMS.size  # 76
PACKED_GROUP_SIZES = (32, 64)  # what the packed kernel multiplies
PACKED_ALIGN = 64  # where the packed matrices start: the kernel's aligned loads


@dataclass(frozen=True)
class Rope:
    """How a model rotates queries and keys: transformers' rope_theta and rope_scaling (none;
    linear: every frequency / factor; llama3: Llama 3.1's frequency-dependent factor between
    low_freq_factor and high_freq_factor wavelengths of original_max_position). Stored as float32,
    the precision the frequencies are computed in."""
    theta: float = ROPE_THETA
    scaling: str = "none"
    factor: float = 1.0
    low_freq_factor: float = 0.0
    high_freq_factor: float = 0.0
    original_max_position: int = 0


@dataclass(frozen=True)
class Header:
    """What a model file's header says."""
    version: int  # 0, 1, 2 or 3
    config: dict  # CONFIG_FIELDS -> int (vocab_size positive)
    shared_classifier: bool  # the classifier is the token embedding table
    group_size: int = 0  # v2, and v3 with Q8_0 tensors; 0 for fp32 tensors
    rope: Rope = Rope()  # v3 only; run.c's for the others
    norm_eps: float = NORM_EPS  # v3 only; run.c's for the others
    layout: int = 0  # v3 only: 1 when the matrices are packed (LAYOUTS)

    @property
    def size(self):
        """Bytes of header before the weights."""
        return V0_HEADER_SIZE if self.version == 0 else HEADER_SIZE

    @property
    def quantized(self):
        """Q8_0 tensors (runq's), else fp32 (run's)."""
        return self.version == 2 or (self.version == 3 and self.group_size > 0)

    def file_size(self):
        """The size in bytes of a file with this header."""
        return self.size + weights_nbytes(self)

    def describe(self):
        text = ", ".join(f"{k}={v}" for k, v in self.config.items())
        text += f", group_size={self.group_size}" if self.quantized else ""
        if self.version == 3:
            text += f", {describe_model(self.rope, self.norm_eps)}"
        if self.layout:
            text += ", packed matrices"
        return text


def describe_model(rope, norm_eps):
    """What differs from run.c's constants, in words."""
    text = f"rope_theta={rope.theta:g}, norm_eps={norm_eps:g}"
    if rope.scaling == "linear":
        text += f", linear RoPE scaling by {rope.factor:g}"
    elif rope.scaling == "llama3":
        text += (f", llama3 RoPE scaling (factor {rope.factor:g}, low_freq_factor "
                 f"{rope.low_freq_factor:g}, high_freq_factor {rope.high_freq_factor:g}, "
                 f"original_max_position {rope.original_max_position})")
    return text


def is_llama2(rope, norm_eps):
    """Whether run.c's constants compute this model: then v0, v1 and v2 hold it exactly."""
    return rope == Rope() and norm_eps == NORM_EPS


def pack_v3_params(rope, norm_eps):
    """v3's header fields at V3_PARAMS_OFFSET (see the module docstring)."""
    return V3_PARAMS.pack(rope.theta, norm_eps, ROPE_SCALINGS.index(rope.scaling), rope.factor,
                          rope.low_freq_factor, rope.high_freq_factor, rope.original_max_position)


def rope_frequencies(header):
    """The head_size / 2 RoPE frequencies of a model whose RoPE is not run.c's, as a list of
    float32 values computed as transformers computes them (inv_freq, in float32): run, runq and
    run_cuda rotate with these. None for run.c's own RoPE, which they compute as run.c does."""
    rope = header.rope
    if rope == Rope():
        return None
    head_size = header.config["dim"] // header.config["n_heads"]
    inv_freq = [float32(1.0 / float32(float32(rope.theta) ** float32(i / head_size)))
                for i in range(0, head_size, 2)]
    if rope.scaling == "linear":
        inv_freq = [float32(f / rope.factor) for f in inv_freq]
    elif rope.scaling == "llama3":
        # transformers' _compute_llama3_parameters: long wavelengths are divided by factor, short
        # ones kept, and those in between blended by where the wavelength falls
        old_context = rope.original_max_position
        low_freq_wavelen = old_context / rope.low_freq_factor
        high_freq_wavelen = old_context / rope.high_freq_factor
        scaled = []
        for f in inv_freq:
            wavelen = float32(float32(2 * math.pi) / f)
            if wavelen > low_freq_wavelen:
                scaled.append(float32(f / rope.factor))
            elif wavelen < high_freq_wavelen:
                scaled.append(f)
            else:
                smooth = float32(float32(float32(old_context / wavelen) - rope.low_freq_factor)
                                 / float32(rope.high_freq_factor - rope.low_freq_factor))
                scaled.append(float32(float32(float32(float32(1 - smooth) * f) / rope.factor)
                                      + float32(smooth * f)))
        inv_freq = scaled
    return inv_freq


def _ints(head, offset, count):
    return [int.from_bytes(head[offset + 4 * i:offset + 4 * i + 4], "little", signed=True)
            for i in range(count)]


def parse_header(head, path):
    """The Header of a file that starts with the bytes head (at least 256 of them, or the whole
    file): v1/v2/v3 when it starts with the magic number, else v0. Checks nothing but the length
    (check_header checks the numbers)."""
    if int.from_bytes(head[:4], "little") == MAGIC and len(head) >= 8:
        version = _ints(head, 4, 1)[0]
        if version not in (1, 2, 3):
            raise LlamaError(f"{path}: unknown llama2.c file version {version} (1, 2 and 3 exist)")
        if len(head) < HEADER_SIZE:
            raise LlamaError(f"{path}: file is {len(head)} bytes, too small for a v{version} header")
        config = dict(zip(CONFIG_FIELDS, _ints(head, 8, 7)))
        group_size = _ints(head, 37, 1)[0] if version >= 2 else 0
        if version != 3:
            return Header(version, config, head[36] != 0, group_size)
        theta, eps, scaling, factor, low, high, original = V3_PARAMS.unpack_from(head, V3_PARAMS_OFFSET)
        if not 0 <= scaling < len(ROPE_SCALINGS):
            raise LlamaError(f"{path}: bad header: rope_scaling = {scaling} (0 none, 1 linear, "
                             f"2 llama3)")
        layout = V3_LAYOUT.unpack_from(head, V3_LAYOUT_OFFSET)[0]
        if not 0 <= layout < len(LAYOUTS):
            raise LlamaError(f"{path}: bad header: layout = {layout} (0 rows, 1 packed; a newer "
                             f"format?)")
        if head[36] > 1 or any(head[41:V3_PARAMS_OFFSET]) or \
                any(head[V3_LAYOUT_OFFSET + V3_LAYOUT.size:HEADER_SIZE]):
            # a field that this reader does not know would be ignored: refuse instead
            raise LlamaError(f"{path}: bad header: v3 bytes that must be 0 are not (a newer "
                             f"format?)")
        rope = Rope(theta, ROPE_SCALINGS[scaling], factor, low, high, original)
        return Header(3, config, head[36] != 0, group_size, rope, eps, layout)
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


def packed_tensors(config):
    """(name, count, rows, cols) of the matrices a layout-1 file packs, in file order: wcls
    always, the embedding table packed again when the classifier is shared."""
    return quantized_tensors(config, False)[1:]


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


def check_model_params(config, rope, norm_eps, where):
    """Refuses RoPE and RMSNorm parameters that describe no model (transformers' rules for its
    rope_scaling), naming the field; where starts the line."""
    def positive(name, value):
        if not (math.isfinite(value) and value > 0):
            raise LlamaError(f"{where}: {name} = {value!r} (must be a finite number > 0)")

    positive("rope_theta", rope.theta)
    positive("norm_eps", norm_eps)
    if rope.scaling not in ROPE_SCALINGS:
        raise LlamaError(f"{where}: rope scaling {rope.scaling!r} is not one of {ROPE_SCALINGS}")
    if rope.scaling == "none":
        if (rope.factor, rope.low_freq_factor, rope.high_freq_factor,
                rope.original_max_position) != (1.0, 0.0, 0.0, 0):
            raise LlamaError(f"{where}: RoPE scaling parameters without a rope_scaling")
        return
    positive("rope_factor", rope.factor)
    if rope.scaling == "linear":
        if (rope.low_freq_factor, rope.high_freq_factor, rope.original_max_position) != (0.0, 0.0, 0):
            raise LlamaError(f"{where}: llama3 RoPE parameters with linear scaling")
        return
    positive("rope_low_freq_factor", rope.low_freq_factor)
    positive("rope_high_freq_factor", rope.high_freq_factor)
    if not rope.high_freq_factor > rope.low_freq_factor:
        raise LlamaError(f"{where}: rope_high_freq_factor = {rope.high_freq_factor:g} is not "
                         f"above rope_low_freq_factor = {rope.low_freq_factor:g}")
    if not 0 < rope.original_max_position <= MAX_SEQ_LEN:
        raise LlamaError(f"{where}: rope_original_max_position = {rope.original_max_position} "
                         f"(must be in 1..{MAX_SEQ_LEN})")


def check_header(header, path):
    """Refuses a header whose numbers do not describe a model; the line names path and the field."""
    check_config(header.config, f"{path}: bad header")
    if header.quantized:
        check_group_size(header.config, header.group_size, header.shared_classifier,
                         f"{path}: bad header")
    elif header.group_size < 0:
        raise LlamaError(f"{path}: bad header: group_size = {header.group_size} (0 for float32 "
                         f"weights, > 0 for Q8_0)")
    if header.version == 3:
        check_model_params(header.config, header.rope, header.norm_eps, f"{path}: bad header")
    if header.layout:
        check_packable(header.config, header.group_size, f"{path}: bad header")


def check_packable(config, group_size, where):
    """Refuses a group size that the packed layout (layout 1) cannot hold: the packed kernel's
    group sizes only, each row made of whole groups."""
    if group_size not in PACKED_GROUP_SIZES:
        raise LlamaError(f"{where}: group_size = {group_size}: packed matrices need a group "
                         f"size of 32 or 64")
    for name in ("dim", "hidden_dim"):
        if config[name] % group_size:
            raise LlamaError(f"{where}: group_size = {group_size} does not divide {name} = "
                             f"{config[name]} (packed matrices need rows of whole groups)")


def packed_size(rows, cols, group_size):
    """(bytes of int8 values, number of float32 scales) of a (rows, cols) matrix in the packed
    layout: q8matmul.h's q8_packed_bytes and q8_packed_scales."""
    blocks = -(-rows // 16)
    return blocks * -(-cols // 64) * 1024, blocks * (cols // group_size) * 16


def packed_start(header):
    """The file offset of a layout-1 file's first packed matrix (after the norms, the embedding
    table in rows and the padding to PACKED_ALIGN)."""
    end = _rows_end(header.config, header.group_size)
    return end + packed_padding(header.config, header.group_size)


def packed_padding(config, group_size):
    """The zero bytes a layout-1 file has between its embedding table and its first packed
    matrix (a writer counts them: a pipe has no file position to align)."""
    return -_rows_end(config, group_size) % PACKED_ALIGN


def _rows_end(config, group_size):
    # where a layout-1 file's header, norms and embedding table (Q8_0 rows) end
    norms = 4 * (2 * config["n_layers"] * config["dim"] + config["dim"])
    embedding = config["vocab_size"] * config["dim"]
    return HEADER_SIZE + norms + embedding + 4 * (embedding // group_size)


def weights_nbytes(header):
    """Bytes of weights after the header (Python ints: no overflow)."""
    c = header.config
    norms = 2 * c["n_layers"] * c["dim"] + c["dim"]  # rms_att, rms_ffn, rms_final
    matrices = quantized_tensors(c, header.shared_classifier)
    if header.layout:  # the embedding in rows, then every matrix packed, the classifier too
        end = packed_start(header)
        for _, count, rows, cols in packed_tensors(c):
            values, scales = packed_size(rows, cols, header.group_size)
            end += count * (values + 4 * scales)
        return end - header.size
    if header.quantized:  # int8 values and one fp32 scale per group
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


def map_model(checkpoint, quantized, prog, populate=True):
    """(Header, read-only mmap) of a model file with Q8_0 tensors (v2, v3 with a group size: runq)
    or with fp32 ones (v0, v1, v3 without: run), as quantized says. Every
    size is checked against the file before the C code makes a pointer into it (run.c and runq.c
    trust the header). populate (or populate(header), a function of the Header): map every page
    now (Linux's MAP_POPULATE), unless the file is larger than the machine's memory: then it is
    mapped as it is read, and a warning on stderr says that every token reads it from disk."""
    path = os.fsdecode(checkpoint)
    try:
        f = open(checkpoint, "rb")
    except OSError as e:
        raise LlamaError(f"couldn't open file {path}: {e.strerror}") from None
    with f:
        file_size = os.fstat(f.fileno()).st_size
        head = f.read(HEADER_SIZE)
        header = parse_header(head, path)
        if header.quantized != quantized:
            raise LlamaError(_wrong_version(header, head, file_size, path))
        check_header(header, path)
        check_file_size(header, file_size, path)
        check_kv_cache_fits(header.config, f"{path}: bad header")
        if callable(populate):
            populate = populate(header)
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
    if header.quantized:
        return f"{path}: is a version {header.version} (int8 Q8_0) file: run it with runq"
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

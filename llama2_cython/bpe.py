"""BPE tokenizers with the standard library alone: byte-level ones (GPT-2, SmolLM, Llama 3) and
sentencepiece-style ones (Llama 2, TinyLlama), the same ids and text as Hugging Face's `tokenizers`
gives for the same file.

    tok = load("folder/")        # its tokenizer.json, else its tokenizer.model (tiktoken ranks)
    tok.encode("Hello world")    # Llama 3: [128000, 9906, 1917]
    tok.decode(ids), tok.piece(id), tok.vocab_size, tok.bos_id, tok.eos_ids

What a tokenizer.json may hold is what these models use, told apart by the decoder. With a
ByteLevel decoder: a BPE model over GPT-2's byte-to-unicode alphabet, no normalizer, the
pre-tokenizers ByteLevel, Split (GPT-2's or Llama 3's regex) and Digits. Otherwise, as
sentencepiece's BPE converted by transformers: characters with "\u2581" for a space, <0xNN>
tokens for the bytes of a character without one (byte_fallback) or <unk>; the marks put in by a
normalizer of Prepend and Replace (older files) or by a Metaspace pre-tokenizer (newer ones,
prepend_scheme "first"); a Metaspace decoder or a Sequence of Replace, ByteFallback, Fuse and
Strip. Both: TemplateProcessing. Anything else is refused by name rather than approximated. A
tiktoken file (Meta's Llama 3 tokenizer.model: "base64-bytes rank" per line) is read as Hugging
Face's converted Llama 3 tokenizer behaves: Llama 3's regex, a merge of two adjacent parts ranked
by the rank of their concatenation, the special tokens after the ranks (named by
tokenizer_config.json), BOS put in front by encode(). A sentencepiece tokenizer.model (protobuf)
is not read here: tokenizer.py converts it to run.c's tokenizer.bin.

The pre-tokenizer regexes use \\p{L} and \\p{N}, which Python's `re` lacks: the classes are built
here from unicodedata, plus the letters and numbers that Unicode 15.0 and 16.0 added (tokenizers'
Oniguruma and tiktoken use 16.0 tables; Python 3.11 has 14.0). We keep our own code rather than
depend on `regex` or `tokenizers`, so that `python -m run` needs no package.
"""
import base64
import binascii
import heapq
import json
import os
import re
import unicodedata

from . import LlamaError

# Letters (\p{L}) and numbers (\p{N}) new in Unicode 15.0-16.0, as inclusive code point ranges:
# the difference between tokenizers 0.23's classes and Python 3.11's unicodedata, measured over
# every code point (tests/test_bpe.py checks the whole table against tokenizers).
_NEWER_LETTERS = (
    (0x1C89, 0x1C8A), (0xA7CB, 0xA7CD), (0xA7DA, 0xA7DC), (0x105C0, 0x105F3), (0x10D4A, 0x10D65),
    (0x10D6F, 0x10D85), (0x10EC2, 0x10EC4), (0x1123F, 0x11240), (0x11380, 0x11389),
    (0x1138B, 0x1138B), (0x1138E, 0x1138E), (0x11390, 0x113B5), (0x113B7, 0x113B7),
    (0x113D1, 0x113D1), (0x113D3, 0x113D3), (0x11BC0, 0x11BE0), (0x11F02, 0x11F02),
    (0x11F04, 0x11F10), (0x11F12, 0x11F33), (0x1342F, 0x1342F), (0x13441, 0x13446),
    (0x13460, 0x143FA), (0x16100, 0x1611D), (0x16D40, 0x16D6C), (0x18CFF, 0x18CFF),
    (0x1B132, 0x1B132), (0x1B155, 0x1B155), (0x1DF25, 0x1DF2A), (0x1E030, 0x1E06D),
    (0x1E4D0, 0x1E4EB), (0x1E5D0, 0x1E5ED), (0x1E5F0, 0x1E5F0), (0x2B739, 0x2B739),
    (0x2EBF0, 0x2EE5D), (0x31350, 0x323AF))
_NEWER_NUMBERS = (
    (0x10D40, 0x10D49), (0x116D0, 0x116E3), (0x11BF0, 0x11BF9), (0x11F50, 0x11F59),
    (0x16130, 0x16139), (0x16D70, 0x16D79), (0x1CCF0, 0x1CCF9), (0x1D2C0, 0x1D2D3),
    (0x1E4F0, 0x1E4F9), (0x1E5F1, 0x1E5FA))
# \s of Oniguruma and of Rust's regex: Unicode's White_Space. Python's \s would add \x1c-\x1f.
_WHITESPACE = ((0x09, 0x0D), (0x20, 0x20), (0x85, 0x85), (0xA0, 0xA0), (0x1680, 0x1680),
               (0x2000, 0x200A), (0x2028, 0x2029), (0x202F, 0x202F), (0x205F, 0x205F),
               (0x3000, 0x3000))

# The regexes tokenizer.json files carry, by their exact text (a Split's pattern; ByteLevel's
# use_regex means GPT2). Llama 3's is also what a tiktoken file is split with.
GPT2_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
                  r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

LLAMA3_RANKS = 128000  # Meta's tokenizer.model: the special tokens follow, 128000..128255
# Llama 3.1+'s named special tokens; every other id from 128000 to 128255 is
# <|reserved_special_token_N|>, N counting up from 0 (the names when no tokenizer_config.json says)
LLAMA3_NAMED = {128000: "<|begin_of_text|>", 128001: "<|end_of_text|>",
                128004: "<|finetune_right_pad_id|>", 128006: "<|start_header_id|>",
                128007: "<|end_header_id|>", 128008: "<|eom_id|>", 128009: "<|eot_id|>",
                128010: "<|python_tag|>"}
LLAMA3_SPECIALS = 256
LLAMA3_STOP = ("<|end_of_text|>", "<|eot_id|>")  # Meta's stop tokens, when no config names one

MARK = "\u2581"  # sentencepiece's word mark: a space in its vocabularies

_CACHE_LIMIT = 1 << 17  # pre-tokens whose ids are remembered; the cache empties when full
_NEVER = 1 << 62  # the rank of a pair that never merges
_LONG_PIECE = 128  # parts from which _merge_heap beats the quadratic list of ranks


def _byte_alphabet():
    """GPT-2's stand-in character for each byte: printable Latin-1 bytes stand for themselves, the
    others (controls, space, 0x7f-0xa0, soft hyphen) take 256, 257, ... in byte order."""
    chars = []
    extra = 256
    for b in range(256):
        if 0x21 <= b <= 0x7E or 0xA1 <= b <= 0xAC or 0xAE <= b <= 0xFF:
            chars.append(chr(b))
        else:
            chars.append(chr(extra))
            extra += 1
    return chars


BYTE_CHARS = _byte_alphabet()
CHAR_BYTES = {c: b for b, c in enumerate(BYTE_CHARS)}
_LATIN1_TO_BYTE_CHARS = str.maketrans({chr(b): c for b, c in enumerate(BYTE_CHARS)})

_regexes = {}  # pattern name -> compiled Python regex, built on first use (unicodedata scan)


def _class_body(ranges):
    return "".join(f"\\U{a:08x}" if a == b else f"\\U{a:08x}-\\U{b:08x}" for a, b in ranges)


def _ranges(code_points):
    out = []
    for c in code_points:
        if out and out[-1][1] == c - 1:
            out[-1][1] = c
        else:
            out.append([c, c])
    return out


def _unicode_classes():
    """(letters, numbers, whitespace) as bodies of Python character classes."""
    if "classes" not in _regexes:
        category = unicodedata.category
        letters, numbers = [], []
        for c in range(0x110000):
            kind = category(chr(c))[0]
            if kind == "L":
                letters.append(c)
            elif kind == "N":
                numbers.append(c)
        letters = set(letters).union(*(range(a, b + 1) for a, b in _NEWER_LETTERS))
        numbers = set(numbers).union(*(range(a, b + 1) for a, b in _NEWER_NUMBERS))
        _regexes["classes"] = (_class_body(_ranges(sorted(letters))),
                               _class_body(_ranges(sorted(numbers))), _class_body(_WHITESPACE))
    return _regexes["classes"]


def _regex(name):
    """The compiled Python twin of a known pattern: "gpt2", "llama3", or "digit"/"digits" (one
    \\p{N}, a run of them: the Digits pre-tokenizer's split; Rust's char::is_numeric is \\p{N})."""
    if name not in _regexes:
        L, N, S = _unicode_classes()
        if name == "gpt2":
            source = (rf"'s|'t|'re|'ve|'m|'ll|'d| ?[{L}]+| ?[{N}]+| ?[^{S}{L}{N}]+"
                      rf"|[{S}]+(?![^{S}])|[{S}]+")
        elif name == "llama3":
            # (?i:...) spelled out: case folding adds only the long s (U+017F) to these letters
            source = (r"'[sS\u017f]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD]"
                      rf"|[^\r\n{L}{N}]?[{L}]+|[{N}]{{1,3}}| ?[^{S}{L}{N}]+[\r\n]*"
                      rf"|[{S}]*[\r\n]+|[{S}]+(?![^{S}])|[{S}]+")
        elif name == "digit":
            source = rf"([{N}])"
        else:
            source = rf"([{N}]+)"
        _regexes[name] = re.compile(source)
    return _regexes[name]


class BpeTokenizer:
    """A loaded tokenizer; see load(). Its tables are read-only after load."""

    def __init__(self, source, vocab_size, piece_bytes, special_ids, added, pre_tokenize, bpe,
                 prefix_ids, suffix_ids, eos_ids, normalize=None, decoder=None):
        self.source = source
        self.vocab_size = vocab_size
        self._piece_bytes = piece_bytes  # id -> bytes, what piece() gives
        self._special_ids = special_ids  # what decode(skip_special_tokens=True) leaves out
        # (the added tokens not normalized, the normalized ones): each (regex, {text: id}) or None
        self._added = added
        self._normalize = normalize  # str -> str for the text between added tokens, or None
        self._pre_tokenize = pre_tokenize  # (str, at_start) -> pre-tokens (str)
        self._bpe = bpe  # one pre-token -> list of ids
        # (id -> token text, [token texts] -> text) as tokenizers' decoder does it; None: the
        # pieces' bytes joined (ByteLevel)
        self._decoder = decoder
        # the decoder drops the text's first space (sentencepiece-style: Strip, or Metaspace with
        # a prefix): whoever prints pieces one by one drops it too, as run.c does after BOS
        self.strips_first_space = decoder is not None and decoder[2]
        self._prefix_ids = list(prefix_ids)
        self._suffix_ids = list(suffix_ids)
        self.bos_id = prefix_ids[0] if prefix_ids else None
        self.eos_ids = tuple(eos_ids)
        self._cache = {}

    def _segments(self, text):
        """text cut around the added tokens as tokenizers' AddedVocabulary cuts it: the tokens not
        normalized matched in the text (leftmost-longest), the text between them normalized, then
        the normalized tokens matched in that. [(str, None, at_start) or (text, id, False)];
        at_start: the piece begins the text (Metaspace's prepend_scheme "first")."""
        raw, normalized = self._added
        segments = [(text, None, True)] if text else []
        if raw is not None:
            segments = _cut(segments, *raw)
        if self._normalize is not None:
            segments = [(self._normalize(segment), None, at_start) if token_id is None
                        else (segment, token_id, at_start)
                        for segment, token_id, at_start in segments]
        if normalized is not None:
            segments = _cut(segments, *normalized)
        return segments

    def encode(self, text, add_special_tokens=True):
        """text's ids, as tokenizers' Tokenizer.encode(text, add_special_tokens).ids."""
        if not isinstance(text, str):
            raise LlamaError(f"{self.source}: encode() takes a str, not {type(text).__name__}")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise LlamaError(f"{self.source}: the text holds a lone surrogate "
                             f"U+{ord(text[e.start]):04X} at index {e.start}, which UTF-8 "
                             f"cannot encode") from None
        ids = []
        cache = self._cache
        bpe = self._bpe
        for segment, token_id, at_start in self._segments(text):
            if token_id is not None:
                ids.append(token_id)
                continue
            for piece in self._pre_tokenize(segment, at_start):
                piece_ids = cache.get(piece)
                if piece_ids is None:
                    if len(cache) >= _CACHE_LIMIT:
                        cache.clear()
                    piece_ids = cache[piece] = bpe(piece)
                ids.extend(piece_ids)
        if add_special_tokens:
            return self._prefix_ids + ids + self._suffix_ids
        return ids

    def _check_id(self, token_id):
        if isinstance(token_id, bool) or not hasattr(token_id, "__index__"):
            raise LlamaError(f"{self.source}: token id {token_id!r} is not an integer")
        token_id = token_id.__index__()
        if not 0 <= token_id < self.vocab_size:
            raise LlamaError(f"{self.source}: token id {token_id} is out of range "
                             f"(0..{self.vocab_size - 1})")
        return token_id

    def piece(self, token_id):
        """The bytes token_id stands for (a special token: its text in UTF-8), to print tokens
        one at a time. With a ByteLevel decoder, joined and decoded they give decode(). With a
        sentencepiece-style one, "\u2581" is a space and <0xNN> the byte NN, but decode() also
        strips the text's first space (as run.c does after BOS) and makes a byte run that is not
        UTF-8 one U+FFFD per byte."""
        return self._piece_bytes[self._check_id(token_id)]

    def decode(self, ids, skip_special_tokens=False):
        """The text of ids, as tokenizers' decode (invalid UTF-8 turned into U+FFFD). Unlike
        tokenizers, an id out of range is an error, not silently dropped."""
        kept = []
        for token_id in ids:
            token_id = self._check_id(token_id)
            if not (skip_special_tokens and token_id in self._special_ids):
                kept.append(token_id)
        if self._decoder is None:
            return b"".join(self._piece_bytes[i] for i in kept).decode("utf-8", "replace")
        tokens, decode_tokens, _ = self._decoder
        return decode_tokens([tokens[i] for i in kept])


def _cut(segments, regex, ids):
    """segments with the matches of regex in their plain text cut out as (text, id, False)."""
    cut = []
    for segment, token_id, at_start in segments:
        if token_id is not None:
            cut.append((segment, token_id, at_start))
            continue
        start = 0
        for match in regex.finditer(segment):
            if match.start() > start:
                cut.append((segment[start:match.start()], None, at_start and start == 0))
            cut.append((match.group(), ids[match.group()], False))
            start = match.end()
        if start < len(segment):
            cut.append((segment[start:], None, at_start and start == 0))
    return cut


# -- BPE proper ----------------------------------------------------------------------------------

# Both BPEs merge the lowest-ranked adjacent pair, the leftmost on a tie, until no pair merges: the
# order of tokenizers' BPE (its queue pops the lowest (rank, position)) and of tiktoken's. A short
# pre-token keeps a list of its pairs' ranks, spelled out in _id_merger and _ranks_bpe for speed
# (min() and index() run in C, but the loop is quadratic); a long one goes to _merge_heap.

def _merge_heap(parts, pair_rank, join):
    """The same merges in the same order, in n log n: a heap of (rank, position) over a
    linked list; an entry whose two parts changed since it was pushed is stale and skipped."""
    count = len(parts)
    after = list(range(1, count + 1))
    after[-1] = -1
    before = list(range(-1, count - 1))
    version = [0] * count
    heap = []
    for i in range(count - 1):
        rank = pair_rank(parts[i], parts[i + 1])
        if rank != _NEVER:
            heap.append((rank, i, 0, 0))
    heapq.heapify(heap)
    while heap:
        _, i, version_i, version_j = heapq.heappop(heap)
        j = after[i]
        if j < 0 or version[i] != version_i or version[j] != version_j:
            continue
        parts[i] = join(parts[i], parts[j])
        version[i] += 1
        version[j] += 1  # j is gone: no entry can name it any more
        k = after[j]
        after[i] = k
        if k >= 0:
            before[k] = i
            rank = pair_rank(parts[i], parts[k])
            if rank != _NEVER:
                heapq.heappush(heap, (rank, i, version[i], version[k]))
        h = before[i]
        if h >= 0:
            rank = pair_rank(parts[h], parts[i])
            if rank != _NEVER:
                heapq.heappush(heap, (rank, h, version[h], version[i]))
    merged = []
    i = 0  # the first part never merges into a neighbour on its left
    while i >= 0:
        merged.append(parts[i])
        i = after[i]
    return merged


def _id_merger(merges):
    """A tokenizer.json's merges applied to a list of ids; merges maps a pair of ids to (rank,
    merged id)."""
    rank_of = {pair: rank for pair, (rank, _) in merges.items()}.get
    merged_id = {pair: new_id for pair, (_, new_id) in merges.items()}

    def pair_rank(left, right):
        return rank_of((left, right), _NEVER)

    def join(left, right):
        return merged_id[left, right]

    def merge(parts):
        if len(parts) > _LONG_PIECE:
            return _merge_heap(parts, pair_rank, join)
        ranks = [rank_of(pair, _NEVER) for pair in zip(parts, parts[1:])]
        while ranks:
            best = min(ranks)
            if best == _NEVER:
                break
            i = ranks.index(best)
            parts[i:i + 2] = [merged_id[parts[i], parts[i + 1]]]
            del ranks[i]
            if i > 0:
                ranks[i - 1] = rank_of((parts[i - 1], parts[i]), _NEVER)
            if i < len(ranks):
                ranks[i] = rank_of((parts[i], parts[i + 1]), _NEVER)
        return parts
    return merge


def _merges_bpe(vocab, merges, ignore_merges, unk_id, fuse_unk):
    """A byte-level tokenizer.json's BPE: vocab maps byte-alphabet strings to ids. A byte without
    a token is dropped, or becomes unk_id (one for a run of them when fuse_unk), and the bytes
    around it can still merge, as in tokenizers."""
    byte_ids = [vocab.get(c) for c in BYTE_CHARS]
    merge = _id_merger(merges)

    def bpe(piece):
        data = piece.encode("utf-8")
        if ignore_merges:
            whole = vocab.get(data.decode("latin-1").translate(_LATIN1_TO_BYTE_CHARS))
            if whole is not None:
                return [whole]
        parts = [byte_ids[b] for b in data]
        if None in parts:
            parts = _unknowns_filled(parts, unk_id, fuse_unk)
        return merge(parts)
    return bpe


def _unknowns_filled(parts, unk_id, fuse_unk):
    """parts (token ids, None for a symbol without a token) with each None as unk_id, one for a
    run of them when fuse_unk, or dropped where there is no unk_id, as tokenizers' BPE does."""
    out = []
    after_unk = False
    for token_id in parts:
        if token_id is None:
            if unk_id is None or (fuse_unk and after_unk):
                continue
            token_id, after_unk = unk_id, True
        else:
            after_unk = False
        out.append(token_id)
    return out


def _chars_bpe(vocab, merges, unk_id, fuse_unk, byte_fallback):
    """A sentencepiece-style tokenizer.json's BPE: the parts are characters. One without a token
    becomes the tokens <0xNN> of its UTF-8 bytes with byte_fallback (the loader made sure all 256
    exist), else unk_id (one for a run of them when fuse_unk), else is dropped."""
    char_id = vocab.get
    byte_ids = [vocab.get(f"<0x{b:02X}>") for b in range(256)]
    merge = _id_merger(merges)

    def bytes_of_unknowns(word, parts):
        return [token_id for c, part in zip(word, parts)
                for token_id in ([part] if part is not None else [byte_ids[b] for b in c.encode("utf-8")])]

    def bpe(word):
        parts = list(map(char_id, word))
        if None in parts:
            parts = (bytes_of_unknowns(word, parts) if byte_fallback
                     else _unknowns_filled(parts, unk_id, fuse_unk))
        return merge(parts)
    return bpe


def _word_chunks(vocab, merge_pairs):
    """word -> its chunks, cut before "\u2581" wherever no merge can join across the cut, so that
    BPE of the chunks is BPE of the word. A sentencepiece-style file has no pre-tokenizer that
    splits, so its BPE would see all the text at once: chunks, mostly words, are quick and hit
    the cache. The part left of a cut always ends in the character before it (parts only grow;
    that character has a token), the part right of it starts with "\u2581"; when no merge joins
    such a pair, each side merges alone, in its own (rank, position) order."""
    if MARK not in vocab:
        return lambda word: [word]
    blocked = {left[-1:] for left, right in merge_pairs if right[:1] == MARK}
    cuttable = frozenset(c for c in vocab if len(c) == 1 and c != MARK and c not in blocked)
    mark_runs = re.compile(f"{MARK}+[^{MARK}]*|[^{MARK}]+").findall

    def chunks(word):
        out = []
        pending = []
        for run in mark_runs(word):
            pending.append(run)
            if run[-1] in cuttable:  # the next run, if any, starts with the mark
                out.append("".join(pending))
                pending = []
        if pending:
            out.append("".join(pending))
        return out
    return chunks


def _ranks_bpe(ranks_of):
    """tiktoken's BPE: a whole pre-token that is a token stays one; otherwise parts merge by the
    rank of their concatenation."""
    rank_of = ranks_of.get

    def pair_rank(left, right):
        return rank_of(left + right, _NEVER)

    def join(left, right):
        return left + right

    def bpe(piece):
        data = piece.encode("utf-8")
        whole = rank_of(data)
        if whole is not None:
            return [whole]
        parts = [data[i:i + 1] for i in range(len(data))]
        if len(parts) > _LONG_PIECE:
            return [ranks_of[part] for part in _merge_heap(parts, pair_rank, join)]
        ranks = [rank_of(left + right, _NEVER) for left, right in zip(parts, parts[1:])]
        while ranks:
            best = min(ranks)
            if best == _NEVER:
                break
            i = ranks.index(best)
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
            del ranks[i]
            if i > 0:
                ranks[i - 1] = rank_of(parts[i - 1] + parts[i], _NEVER)
            if i < len(ranks):
                ranks[i] = rank_of(parts[i] + parts[i + 1], _NEVER)
        return [ranks_of[part] for part in parts]
    return bpe


# -- reading files -------------------------------------------------------------------------------

def _read_text(path):
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except OSError as e:
        raise LlamaError(f"{path}: cannot read ({e.strerror or e})") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise LlamaError(f"{path}: not UTF-8 text (byte {e.start})") from None


def _read_json(path):
    text = _read_text(path)
    try:
        doc = json.loads(text)
    except ValueError as e:
        raise LlamaError(f"{path}: not JSON ({e})") from None
    except RecursionError:
        raise LlamaError(f"{path}: JSON nested too deeply to read") from None
    if not isinstance(doc, dict):
        raise LlamaError(f"{path}: not a JSON object but a {_json_type(doc)}")
    return doc


def _json_type(value):
    if value is None:
        return "null"
    return {bool: "boolean", int: "number", float: "number", str: "string", list: "list",
            dict: "object"}.get(type(value), type(value).__name__)


class _Fields:
    """Typed access to one JSON object: each field checked before use, errors as one line."""

    def __init__(self, path, obj, where):
        self.path, self.obj, self.where = path, obj, where

    def fail(self, message):
        raise LlamaError(f"{self.path}: {message}")

    def get(self, key, kinds, default=KeyError):
        """obj[key] if its type is one of kinds (bool, int, str, list, dict, None); default if
        absent (KeyError: required)."""
        if key not in self.obj:
            if default is KeyError:
                self.fail(f"{self.where} has no \"{key}\"")
            return default
        value = self.obj[key]
        for kind in kinds:
            if kind is None and value is None:
                return value
            if kind is int and isinstance(value, int) and not isinstance(value, bool):
                return value
            if kind is not None and kind is not int and isinstance(value, kind):
                return value
        names = " or ".join(dict.fromkeys("null" if k is None else _json_type(k()) for k in kinds))
        self.fail(f"{self.where}.{key} is a {_json_type(value)}, expected {names}")

    def sub(self, key, kinds=(dict,), default=KeyError):
        value = self.get(key, kinds, default)
        if isinstance(value, dict):
            return _Fields(self.path, value, f"{self.where}.{key}")
        return value

    def false(self, key):
        """A flag we only support off."""
        if self.get(key, (bool, None), False):
            self.fail(f"{self.where}.{key} = true is not supported")


def _check_added_flags(fields):
    for flag in ("lstrip", "rstrip", "single_word"):
        fields.false(flag)


def _added_matchers(added):
    """(matcher of the tokens not normalized, of the normalized ones), each (regex, {text: id})
    or None, for the added tokens [(text, id, normalized)]; a normalized token's text is its
    content normalized, to be found in normalized text. Longest alternative first gives
    leftmost-longest matching."""
    matchers = []
    for normalized in (False, True):
        ids = {text: token_id for text, token_id, norm in added if norm == normalized}
        if ids:
            alternatives = sorted(ids, key=len, reverse=True)
            matchers.append((re.compile("|".join(map(re.escape, alternatives))), ids))
        else:
            matchers.append(None)
    return tuple(matchers)


def _sequence_parts(fields, key):
    """A component's parts: the items of a Sequence (its list under key), or the one component."""
    if fields.get("type", (str,)) != "Sequence":
        return [fields]
    parts = []
    for i, item in enumerate(fields.get(key, (list,))):
        if not isinstance(item, dict):
            fields.fail(f"{fields.where}.{key}[{i}] is a {_json_type(item)}, expected object")
        parts.append(_Fields(fields.path, item, f"{fields.where}.{key}[{i}]"))
    return parts


def _pre_tokenizer_stages(fields):
    """The split functions of a tokenizer.json pre_tokenizer; it must end in ByteLevel."""
    parts = _sequence_parts(fields, "pretokenizers")
    stages = []
    for n, part in enumerate(parts):
        kind = part.get("type", (str,))
        last = n == len(parts) - 1
        if kind == "ByteLevel":
            if not last:
                part.fail(f"{part.where}: ByteLevel before another pre-tokenizer is not supported")
            part.false("add_prefix_space")
            part.get("trim_offsets", (bool,), True)  # offsets only
            if part.get("use_regex", (bool,), True):
                stages.append(_regex("gpt2").findall)
        elif kind == "Split":
            pattern = part.sub("pattern")
            regex = pattern.get("Regex", (str,), None)
            if regex is None:
                part.fail(f"{part.where}.pattern: only a Regex pattern is supported")
            behavior = part.get("behavior", (str,))
            if behavior != "Isolated":
                part.fail(f"{part.where}.behavior = {behavior!r}: only \"Isolated\" is supported")
            part.false("invert")
            known = {GPT2_PATTERN: "gpt2", LLAMA3_PATTERN: "llama3"}
            if regex not in known:
                part.fail(f"{part.where}.pattern.Regex {regex!r} is not one we implement "
                          f"(GPT-2's or Llama 3's)")
            # every character is matched by one alternative, so findall leaves nothing out
            stages.append(_regex(known[regex]).findall)
        elif kind == "Digits":
            individual = part.get("individual_digits", (bool,), False)
            stages.append(_regex("digit" if individual else "digits").split)
        else:
            part.fail(f"{part.where}: pre-tokenizer {kind!r} is not supported")
    if not parts or parts[-1].obj.get("type") != "ByteLevel":
        fields.fail("pre_tokenizer does not end in ByteLevel; only byte-level BPE is supported")
    return stages


def _split_by(stages):
    """(segment, at_start) -> segment split by each of stages in turn (at_start is not used)."""
    def pre_tokenize(segment, at_start):
        pieces = [segment]
        for stage in stages:
            pieces = [p for piece in pieces for p in stage(piece) if p]
        return pieces
    return pre_tokenize


def _string_pattern(part):
    """The text of a Replace's pattern: only {"String": non-empty text} is supported."""
    text = part.sub("pattern").get("String", (str,), None)
    if not text:
        part.fail(f"{part.where}.pattern: only a non-empty String pattern is supported")
    return text


def _normalizer(fields):
    """str -> str for a normalizer of Prepend and Replace (String) steps; None for null."""
    if fields is None:
        return None
    steps = []  # (None, text to prepend) or (old, new)
    for part in _sequence_parts(fields, "normalizers"):
        kind = part.get("type", (str,))
        if kind == "Prepend":
            steps.append((None, part.get("prepend", (str,))))
        elif kind == "Replace":
            steps.append((_string_pattern(part), part.get("content", (str,))))
        else:
            part.fail(f"{part.where}: normalizer {kind!r} is not supported (only Prepend and "
                      f"Replace)")

    def normalize(text):
        for old, new in steps:
            if old is not None:
                text = text.replace(old, new)
            elif text:  # Prepend leaves an empty text empty
                text = new + text
        return text
    return normalize


def _metaspace_options(part):
    """(replacement, prepend_scheme) of a Metaspace pre-tokenizer or decoder, as tokenizers reads
    them (an older file's add_prefix_space true is the default scheme, "always")."""
    replacement = part.get("replacement", (str,))
    if len(replacement) != 1:
        part.fail(f"{part.where}.replacement {replacement!r} is not one character")
    scheme = part.get("prepend_scheme", (str,), "always")
    if scheme not in ("always", "first", "never"):
        part.fail(f"{part.where}.prepend_scheme {scheme!r} is not always, first or never")
    if part.get("add_prefix_space", (bool, None), None) is False and scheme != "never":
        part.fail(f"{part.where}: add_prefix_space false contradicts prepend_scheme {scheme!r}")
    return replacement, scheme


def _metaspace_pre_tokenizer(fields, chunks):
    """(segment, at_start) -> pre-tokens of a sentencepiece-style file: its chunks when the
    pre_tokenizer is null (the normalizer put the marks in); with Metaspace, spaces become the
    replacement, which goes in front (unless there already) by prepend_scheme ("first": only
    of the segment that begins the text), and split cuts before each replacement."""
    if fields is None:
        return lambda segment, at_start: chunks(segment)
    parts = _sequence_parts(fields, "pretokenizers")
    for part in parts:
        kind = part.get("type", (str,))
        if kind != "Metaspace":
            part.fail(f"{part.where}: pre-tokenizer {kind!r} is not supported with a "
                      f"sentencepiece-style decoder (only Metaspace)")
    if len(parts) != 1:
        fields.fail(f"{fields.where}: only one Metaspace pre-tokenizer is supported")
    replacement, scheme = _metaspace_options(parts[0])
    split = parts[0].get("split", (bool,), True)
    mark = re.escape(replacement)
    words = re.compile(f"{mark}[^{mark}]*|[^{mark}]+").findall

    def pre_tokenize(segment, at_start):
        segment = segment.replace(" ", replacement)
        if (scheme == "always" or scheme == "first" and at_start) \
                and not segment.startswith(replacement):
            segment = replacement + segment
        if not split:
            return chunks(segment)
        return [chunk for word in words(segment) for chunk in chunks(word)]
    return pre_tokenize


# a token ByteFallback reads as a byte: what Rust's u8::from_str_radix(_, 16) takes, in <0x...>
_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2}|\+[0-9A-Fa-f])>")


def _byte_run_text(run):
    """ByteFallback's tokens for a run of bytes: their text if UTF-8, else U+FFFD per byte."""
    try:
        return [run.decode("utf-8")]
    except UnicodeDecodeError:
        return ["\ufffd"] * len(run)


def _byte_fallback(tokens):
    out = []
    run = bytearray()
    for token in tokens:
        match = _BYTE_TOKEN.fullmatch(token)
        if match:
            run.append(int(match.group(1), 16))
            continue
        if run:
            out += _byte_run_text(run)
            run = bytearray()
        out.append(token)
    if run:
        out += _byte_run_text(run)
    return out


def _fuse(tokens):
    return ["".join(tokens)]


def _replace_in_each(old, new):
    return lambda tokens: [token.replace(old, new) for token in tokens]


def _strip_each(content, count):
    """Strip's start: up to count copies of content off the front of each token."""
    def strip(tokens):
        out = []
        for token in tokens:
            cut = 0
            while cut < count and cut < len(token) and token[cut] == content:
                cut += 1
            out.append(token[cut:])
        return out
    return strip


def _metaspace_each(replacement, first):
    """Metaspace's decoder: the replacement is a space, except in the first token (first)."""
    return lambda tokens: [token.replace(replacement, first if i == 0 else " ")
                           for i, token in enumerate(tokens)]


def _spm_decoder(fields):
    """(decode: [token texts] -> text, piece: token text -> bytes, strips: whether decode drops
    the text's first space) for a sentencepiece-style decoder: Metaspace, or a Sequence of Replace
    (String), ByteFallback, Fuse and Strip, applied to the list of tokens as tokenizers does.
    piece() is the token alone through the Replaces, Metaspaces and ByteFallback (<0xNN>: the byte
    itself), not stripped."""
    stages = []
    strips = False
    steps = []  # piece(): (old, new) replacements in order, None where ByteFallback is
    for part in _sequence_parts(fields, "decoders"):
        kind = part.get("type", (str,))
        if kind == "Replace":
            old, new = _string_pattern(part), part.get("content", (str,))
            stages.append(_replace_in_each(old, new))
            steps.append((old, new))
        elif kind == "ByteFallback":
            stages.append(_byte_fallback)
            steps.append(None)
        elif kind == "Fuse":
            stages.append(_fuse)
        elif kind == "Strip":
            content = part.get("content", (str,))
            start = part.get("start", (int,))
            if len(content) != 1 or start < 0:
                part.fail(f"{part.where}: content {content!r} is not one character or start "
                          f"{start} is below 0")
            if part.get("stop", (int,)) != 0:
                part.fail(f"{part.where}.stop is not 0: not supported")
            stages.append(_strip_each(content, start))
            # after Fuse, the text's first token is the whole text
            strips = strips or (content == " " and start > 0 and _fuse in stages)
        elif kind == "Metaspace":
            replacement, scheme = _metaspace_options(part)
            strips = strips or scheme != "never"
            stages.append(_metaspace_each(replacement, " " if scheme == "never" else ""))
            steps.append((replacement, " "))
        else:
            part.fail(f"{part.where}: decoder {kind!r} is not supported (only ByteLevel, or "
                      f"Metaspace, Replace, ByteFallback, Fuse and Strip)")

    def decode(tokens):
        for stage in stages:
            tokens = stage(tokens)
        return "".join(tokens)

    def piece(token):
        for step in steps:
            if step is not None:
                token = token.replace(*step)
            else:
                match = _BYTE_TOKEN.fullmatch(token)
                if match:
                    return bytes([int(match.group(1), 16)])
        return token.encode("utf-8")
    return decode, piece, strips


def _post_processor_ids(fields, vocab_size):
    """(prefix ids, suffix ids) that encode(add_special_tokens=True) puts around the text."""
    if fields is None:
        return [], []
    parts = _sequence_parts(fields, "processors")
    prefix, suffix = [], []
    templates = 0
    for part in parts:
        kind = part.get("type", (str,))
        if kind == "ByteLevel":
            continue  # it moves offsets, never ids
        if kind != "TemplateProcessing":
            part.fail(f"{part.where}: post-processor {kind!r} is not supported")
        templates += 1
        if templates > 1:
            part.fail(f"{part.where}: a second TemplateProcessing is not supported")
        specials = part.sub("special_tokens")
        single = part.get("single", (list,))
        seen_text = False
        for i, item in enumerate(single):
            where = f"{part.where}.single[{i}]"
            if not isinstance(item, dict) or len(item) != 1:
                part.fail(f"{where} is not an object with one key")
            ((key, value),) = item.items()
            if not isinstance(value, dict):
                part.fail(f"{where}.{key} is a {_json_type(value)}, expected object")
            element = _Fields(part.path, value, where + "." + key)
            name = element.get("id", (str,))
            element.get("type_id", (int,), 0)  # token types: not ids
            if key == "Sequence":
                if name != "A" or seen_text:
                    element.fail(f"{element.where}: only one sequence, \"A\", is supported")
                seen_text = True
            elif key == "SpecialToken":
                token = specials.sub(name, default=None)
                if token is None:
                    part.fail(f"{where}: special token {name!r} is not in special_tokens")
                ids = token.get("ids", (list,))
                for token_id in ids:
                    if isinstance(token_id, bool) or not isinstance(token_id, int) \
                            or not 0 <= token_id < vocab_size:
                        token.fail(f"{token.where}.ids holds {token_id!r}, not an id below "
                                   f"{vocab_size}")
                (suffix if seen_text else prefix).extend(ids)
            else:
                part.fail(f"{where}: template element {key!r} is not supported")
        if not seen_text:
            part.fail(f"{part.where}.single has no Sequence")
    return prefix, suffix


def _piece_of(token):
    """The bytes tokenizers' ByteLevel decoder gives a token: its characters mapped back to
    bytes when all are in the byte alphabet, otherwise its UTF-8 (added tokens like "<s>" pass
    both ways unchanged)."""
    try:
        return bytes(CHAR_BYTES[c] for c in token)
    except KeyError:
        return token.encode("utf-8")


def _load_tokenizer_json(path, configs):
    """A ByteLevel decoder makes a byte-level file; any other, a sentencepiece-style one."""
    doc = _Fields(path, _read_json(path), "tokenizer.json")
    for key in ("truncation", "padding"):
        if doc.get(key, (dict, list, str, int, bool, None), None) is not None:
            doc.fail(f"{key} is not null: not supported")
    model = doc.sub("model")
    kind = model.get("type", (str,), None)
    if kind != "BPE":
        model.fail(f"model type {kind!r} is not supported (only \"BPE\")")
    decoder = doc.sub("decoder", (dict, None))
    byte_level = decoder is not None and decoder.get("type", (str,)) == "ByteLevel"
    if byte_level:
        if doc.get("normalizer", (dict, list, str, int, bool, None), None) is not None:
            doc.fail("normalizer is not null: not supported")
        normalize = None
    else:
        if decoder is None:
            doc.fail("decoder None is not supported (only ByteLevel, or Metaspace, Replace, "
                     "ByteFallback, Fuse and Strip)")
        decode_tokens, spm_piece, strips_first_space = _spm_decoder(decoder)
        normalize = _normalizer(doc.sub("normalizer", (dict, None), None))
    if model.get("dropout", (int, float, None), None) is not None:
        model.fail("model.dropout is set: BPE dropout is random, not supported")
    for key in ("continuing_subword_prefix", "end_of_word_suffix"):
        if model.get(key, (str, None), None):
            model.fail(f"model.{key} is set: not supported")
    if byte_level:
        model.false("byte_fallback")
        byte_fallback = False
        ignore_merges = model.get("ignore_merges", (bool,), False)
    else:
        byte_fallback = model.get("byte_fallback", (bool,), False)
        model.false("ignore_merges")
        ignore_merges = False
    unk_token = model.get("unk_token", (str, None), None)
    fuse_unk = model.get("fuse_unk", (bool,), False)

    vocab = model.get("vocab", (dict,))
    tokens = {}
    for token, token_id in vocab.items():
        if isinstance(token_id, bool) or not isinstance(token_id, int):
            model.fail(f"model.vocab[{token!r}] is a {_json_type(token_id)}, expected number")
        if token_id in tokens or token_id < 0:
            model.fail(f"model.vocab gives id {token_id} twice or below 0")
        tokens[token_id] = token
    if sorted(tokens) != list(range(len(tokens))):
        model.fail(f"model.vocab's ids are not 0..{len(tokens) - 1} without gaps")
    if unk_token is not None and unk_token not in vocab:
        model.fail(f"model.unk_token {unk_token!r} is not in the vocabulary")
    if byte_fallback:
        # tokenizers falls back to <unk> for a character missing one of its bytes, in an order
        # of its own; the files we know have all 256
        for b in range(256):
            if f"<0x{b:02X}>" not in vocab:
                model.fail(f"model.byte_fallback is true but the vocabulary has no <0x{b:02X}>: "
                           f"not supported")

    merges = {}
    merge_pairs = []
    for rank, merge in enumerate(model.get("merges", (list,))):
        if isinstance(merge, str):
            pair = merge.split(" ")
        elif isinstance(merge, list) and all(isinstance(side, str) for side in merge):
            pair = merge
        else:
            pair = ()
        if len(pair) != 2:
            model.fail(f"model.merges[{rank}] = {merge!r} is not a pair of tokens")
        left, right = pair
        for token in (left, right, left + right):
            if token not in vocab:
                model.fail(f"model.merges[{rank}]: {token!r} is not in the vocabulary")
        merges[vocab[left], vocab[right]] = (rank, vocab[left + right])  # a later duplicate wins
        merge_pairs.append((left, right))

    vocab_size = len(tokens)
    added = []  # (text matched, id, normalized)
    special_contents = set()
    contents = set()
    matched = set()
    texts = dict(tokens)  # id -> its text as tokenizers decodes it: a normalized added token's
    # is its content normalized
    for i, item in enumerate(doc.get("added_tokens", (list,), [])):
        if not isinstance(item, dict):
            doc.fail(f"added_tokens[{i}] is a {_json_type(item)}, expected object")
        entry = _Fields(path, item, f"added_tokens[{i}]")
        token_id = entry.get("id", (int,))
        content = entry.get("content", (str,))
        _check_added_flags(entry)
        normalized = entry.get("normalized", (bool,), True)
        special = entry.get("special", (bool,), False)
        if not content or content in contents:
            entry.fail(f"{entry.where}: empty or repeated content {content!r}")
        contents.add(content)
        # the id tokenizers gives it: the vocabulary's, else the next one after the vocabulary
        expected = vocab.get(content, vocab_size)
        if token_id != expected:
            entry.fail(f"{entry.where}: {content!r} has id {token_id} where tokenizers would "
                       f"give {expected}")
        if token_id == vocab_size:
            vocab_size += 1
        # a normalized token is looked for, and decoded, as its content normalized
        text = normalize(content) if normalized and normalize is not None else content
        if not text or (text, normalized) in matched:
            entry.fail(f"{entry.where}: {content!r} normalizes to {text!r}, empty or another "
                       f"token's: not supported")
        matched.add((text, normalized))
        tokens[token_id] = content
        texts[token_id] = text
        added.append((text, token_id, normalized))
        if special:
            special_contents.add(content)
    # decode(skip_special_tokens=True) leaves out a token whose text is a special token's content
    # (so not a normalized one whose text the normalizer changed, as in tokenizers)
    special_ids = frozenset(i for i, text in texts.items() if text in special_contents)

    if byte_level:
        if doc.get("pre_tokenizer", (dict, None)) is None:
            doc.fail("pre_tokenizer is null; only byte-level BPE (a ByteLevel pre-tokenizer) "
                     "is supported")
        pre_tokenize = _split_by(_pre_tokenizer_stages(doc.sub("pre_tokenizer")))
        bpe = _merges_bpe(vocab, merges, ignore_merges, vocab.get(unk_token), fuse_unk)
        piece_bytes = [_piece_of(tokens[i]) for i in range(vocab_size)]
        decoder = None
    else:
        pre_tokenizer = doc.sub("pre_tokenizer", (dict, None), None)
        pre_tokenize = _metaspace_pre_tokenizer(pre_tokenizer, _word_chunks(vocab, merge_pairs))
        if normalize is not None and pre_tokenizer is not None:
            doc.fail("a normalizer and a pre_tokenizer together are not supported in a "
                     "sentencepiece-style file")
        bpe = _chars_bpe(vocab, merges, vocab.get(unk_token), fuse_unk, byte_fallback)
        token_texts = [texts[i] for i in range(vocab_size)]
        piece_bytes = [spm_piece(token) for token in token_texts]
        decoder = (token_texts, decode_tokens, strips_first_space)
    prefix, suffix = _post_processor_ids(doc.sub("post_processor", (dict, None), None), vocab_size)

    by_content = {token: token_id for token_id, token in tokens.items()}
    eos_ids = _eos_ids(configs, by_content, vocab_size, default=())
    return BpeTokenizer(path, vocab_size, piece_bytes, special_ids,
                        _added_matchers(added), pre_tokenize, bpe, prefix, suffix, eos_ids,
                        normalize, decoder)


def _load_tiktoken(path, configs):
    try:
        with open(path, "rb") as fh:
            text = fh.read().decode("ascii")
    except OSError as e:
        raise LlamaError(f"{path}: cannot read ({e.strerror or e})") from None
    except UnicodeDecodeError as e:
        raise LlamaError(f"{path}: byte {e.start} is not ASCII: not a tiktoken ranks file (a "
                         f"sentencepiece tokenizer.model goes through tokenizer.py: convert it "
                         f"with python tokenizer.py -t {path})") from None
    ranks_of = {}
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()  # the final newline
    for n, line in enumerate(lines, 1):
        fields = line.split(" ")
        try:
            if len(fields) != 2:
                raise ValueError
            token = base64.b64decode(fields[0], validate=True)
            rank = int(fields[1])
        except (ValueError, binascii.Error):
            raise LlamaError(f"{path}: line {n} is not \"base64-token rank\" (a tiktoken ranks "
                             f"file; a sentencepiece tokenizer.model goes through tokenizer.py)") \
                from None
        if rank != len(ranks_of) or not token or token in ranks_of:
            raise LlamaError(f"{path}: line {n}: rank {rank} of {token!r} is not the line's "
                             f"index {len(ranks_of)}, or the token is empty or repeated")
        ranks_of[token] = rank
    missing = [b for b in range(256) if bytes([b]) not in ranks_of]
    if missing:
        raise LlamaError(f"{path}: no rank for the single byte {missing[0]}: every byte needs one")
    n_ranks = len(ranks_of)

    tokenizer_config = configs.get("tokenizer_config.json")
    table = tokenizer_config.sub("added_tokens_decoder", (dict,), None) if tokenizer_config \
        else None
    added, special_ids = [], set()
    if table is not None:
        for key in table.obj:
            entry = table.sub(key)
            if not key.isdigit() or int(key) != n_ranks + len(added):
                table.fail(f"{table.where}: id {key!r} does not follow the {n_ranks} ranks in "
                           f"order without gaps")
            content = entry.get("content", (str,))
            _check_added_flags(entry)
            if not content or any(content == c for c, _, _ in added):
                entry.fail(f"{entry.where}: empty or repeated content {content!r}")
            added.append((content, int(key), entry.get("normalized", (bool,), True)))
            if entry.get("special", (bool,), False):
                special_ids.add(int(key))
    elif n_ranks == LLAMA3_RANKS:
        reserved = 0
        for token_id in range(n_ranks, n_ranks + LLAMA3_SPECIALS):
            name = LLAMA3_NAMED.get(token_id)
            if name is None:
                name = f"<|reserved_special_token_{reserved}|>"
                reserved += 1
            added.append((name, token_id, False))
            special_ids.add(token_id)
    vocab_size = n_ranks + len(added)
    by_content = {content: token_id for content, token_id, _ in added}

    bos = "<|begin_of_text|>"
    if tokenizer_config is not None:
        bos = _token_content(tokenizer_config, "bos_token", bos)
        if bos not in by_content and "bos_token" in tokenizer_config.obj:
            tokenizer_config.fail(f"bos_token {bos!r} is not one of the special tokens")
    prefix = [by_content[bos]] if bos in by_content else []
    default_eos = tuple(by_content[name] for name in LLAMA3_STOP if name in by_content)
    eos_ids = _eos_ids(configs, by_content, vocab_size, default_eos)

    piece_bytes = [b""] * n_ranks
    for token, rank in ranks_of.items():
        piece_bytes[rank] = token
    piece_bytes += [content.encode("utf-8") for content, _, _ in added]
    return BpeTokenizer(path, vocab_size, piece_bytes, frozenset(special_ids),
                        _added_matchers(added), _split_by([_regex("llama3").findall]),
                        _ranks_bpe(ranks_of), prefix, [], eos_ids)


def _token_content(fields, key, default):
    """A tokenizer_config.json token field: a string, {"content": ...} or null."""
    value = fields.get(key, (str, dict, None), None)
    if isinstance(value, dict):
        return fields.sub(key).get("content", (str,))
    return default if value is None else value


def _eos_ids(configs, by_content, vocab_size, default):
    """eos_token_id of generation_config.json, else config.json's, else tokenizer_config.json's
    eos_token, else default."""
    for name in ("generation_config.json", "config.json"):
        fields = configs.get(name)
        if fields is None or fields.get("eos_token_id", (int, list, None), None) is None:
            continue
        value = fields.get("eos_token_id", (int, list))
        ids = value if isinstance(value, list) else [value]
        for token_id in ids:
            if isinstance(token_id, bool) or not isinstance(token_id, int) \
                    or not 0 <= token_id < vocab_size:
                fields.fail(f"eos_token_id {token_id!r} is not an id below {vocab_size}")
        return tuple(ids)
    fields = configs.get("tokenizer_config.json")
    if fields is not None:
        name = _token_content(fields, "eos_token", None)
        if name is not None:
            if name not in by_content:
                fields.fail(f"eos_token {name!r} is not a token of the tokenizer")
            return (by_content[name],)
    return default


_CONFIG_NAMES = ("tokenizer_config.json", "config.json", "generation_config.json")


def _read_configs(folder, config):
    """{file name: _Fields} of the config files found: in config (a folder, or one file read as
    the file of its name, any other name as tokenizer_config.json) when given, else in folder."""
    paths = {}
    if config is not None:
        if os.path.isdir(config):
            folder = config
        elif os.path.exists(config):
            name = os.path.basename(config)
            paths[name if name in _CONFIG_NAMES else "tokenizer_config.json"] = config
            folder = None
        else:
            raise LlamaError(f"{config}: no such file or folder")
    if folder is not None:
        for name in _CONFIG_NAMES:
            if os.path.isfile(os.path.join(folder, name)):
                paths[name] = os.path.join(folder, name)
    return {name: _Fields(p, _read_json(p), name) for name, p in paths.items()}


def tokenizer_in(folder):
    """The tokenizer file of a model folder: its tokenizer.json, else its tokenizer.model."""
    for name in ("tokenizer.json", "tokenizer.model"):
        if os.path.isfile(os.path.join(folder, name)):
            return os.path.join(folder, name)
    raise LlamaError(f"{folder}: the folder holds neither tokenizer.json nor tokenizer.model")


def load(path, config=None):
    """Load a tokenizer.json (byte-level or sentencepiece-style), a tiktoken tokenizer.model, or
    a folder holding either (its tokenizer.json preferred). config: a tokenizer_config.json (or
    config.json, generation_config.json) or a folder of them; when None, those beside path are
    read. Raises LlamaError, one line naming the file, for anything it cannot read exactly."""
    path = os.fspath(path)
    if os.path.isdir(path):
        folder = path
        path = tokenizer_in(folder)
    elif os.path.exists(path):
        folder = os.path.dirname(path) or "."
    else:
        raise LlamaError(f"{path}: no such file or folder")
    configs = _read_configs(folder, None if config is None else os.fspath(config))
    try:
        with open(path, "rb") as fh:
            first = fh.read(64).lstrip()
    except OSError as e:
        raise LlamaError(f"{path}: cannot read ({e.strerror or e})") from None
    if path.endswith(".json") or first.startswith(b"{"):
        return _load_tokenizer_json(path, configs)
    return _load_tiktoken(path, configs)

"""The tokenizer a model runs with, from the path that -z (or Model's tokenizer_path) names:
llama2.c's tokenizer.bin, read by the engine's own Tokenizer (run.c's), or a Hugging Face
tokenizer, read by bpe.py: a tokenizer.json, Meta's tiktoken tokenizer.model (Llama 3), or a model
folder holding either (with the tokenizer_config.json, config.json and generation_config.json
beside it). The file's first bytes decide, not its name. generate(), generate_batch and the API
meet a Hugging Face tokenizer through HFTokenizer, at the few points hf_tokenizer.pxi names."""
import os
import re
import stat

from . import LlamaError, bpe

_JSON = re.compile(rb'\s*\{\s*["}]')  # a tokenizer.bin starting with "{" (0x7b) is followed by 0s
_TIKTOKEN_LINE = re.compile(rb"[A-Za-z0-9+/]+={0,2} [0-9]+\r?\n")
_HEAD = 1024  # bytes read to tell the kinds apart


def _is_sentencepiece(head):
    """A sentencepiece ModelProto begins with its first piece: field 1 (0x0a), a varint length,
    then that SentencePiece's own field 1 (0x0a). A tokenizer.bin begins with a uint32
    max_token_length: this shape would make it at least 0x0a0000."""
    if head[:1] != b"\x0a":
        return False
    i = 1
    while i < len(head) and head[i] & 0x80:
        i += 1
    return head[i + 1:i + 2] == b"\x0a"


def tokenizer_kind(path):
    """What the regular file at path holds: "json" (a tokenizer.json), "tiktoken" (base64 token and
    rank per line), "sentencepiece" (a .model), or "llama2.c" for anything else, which run.c's
    reader then takes or refuses as it always has. None when the file cannot be read here."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(_HEAD)
    except OSError:
        return None
    if _JSON.match(head):
        return "json"
    if _TIKTOKEN_LINE.match(head):
        return "tiktoken"
    if _is_sentencepiece(head):
        return "sentencepiece"
    return "llama2.c"


def open_tokenizer(path, vocab_size, run_c_tokenizer):
    """The tokenizer for a model of vocab_size tokens: run_c_tokenizer(path, vocab_size) (the
    engine's Tokenizer class) for llama2.c's tokenizer.bin, else an HFTokenizer. Bad input raises
    LlamaError, one line naming the file."""
    try:
        mode = os.stat(path).st_mode
    except (OSError, ValueError):
        mode = 0  # run.c's reader says what is wrong, as before
    name = os.fsdecode(path)
    if stat.S_ISDIR(mode):
        name = bpe.tokenizer_in(name)
    elif not stat.S_ISREG(mode):
        # missing, or a FIFO or device: read once, by run.c's reader, as before
        return run_c_tokenizer(path, vocab_size)
    kind = tokenizer_kind(name)
    if kind in (None, "llama2.c"):
        return run_c_tokenizer(path, vocab_size)
    if kind == "sentencepiece":
        raise LlamaError(f"{name} is a sentencepiece model: convert it to llama2.c's tokenizer.bin "
                         f"with `python tokenizer.py -t {name}`")
    return HFTokenizer(bpe.load(name), vocab_size)


def _text(text, what):
    """text as a str: bytes (the command line's) must be UTF-8, which a Hugging Face tokenizer
    encodes; run.c's would take any bytes."""
    if isinstance(text, (bytes, bytearray)):
        try:
            return bytes(text).decode("utf-8")
        except UnicodeDecodeError as e:
            raise LlamaError(f"{what} is not UTF-8 (byte {e.start}): a Hugging Face tokenizer "
                             f"encodes text") from None
    return text


class HFTokenizer:
    """A Hugging Face tokenizer (bpe.BpeTokenizer) for a model of vocab_size tokens. Ids from the
    tokenizer's vocab_size up to the model's (padded embeddings) have no token: they print
    nothing and decode to nothing, as `tokenizers`' decode drops ids it does not know."""

    def __init__(self, tokenizer, vocab_size):
        if tokenizer.vocab_size > vocab_size:
            raise LlamaError(f"{tokenizer.source}: the tokenizer has {tokenizer.vocab_size} "
                             f"tokens, more than the model's vocab_size {vocab_size}")
        self.tokenizer = tokenizer
        self.source = tokenizer.source
        self.vocab_size = vocab_size  # the model's
        self.bos_id = tokenizer.bos_id
        self.eos_ids = frozenset(tokenizer.eos_ids)
        self._pieces = [tokenizer.piece(i) for i in range(tokenizer.vocab_size)]
        self._pieces += [b""] * (vocab_size - tokenizer.vocab_size)
        self._strips_first_space = getattr(tokenizer, "strips_first_space", False)

    def prompt_tokens(self, prompt):
        """The ids generate() starts from: encode(prompt) with the special tokens the tokenizer's
        post-processor adds (Llama 3: BOS; SmolLM: none). None is the empty prompt."""
        tokens = self.tokenizer.encode(_text("" if prompt is None else prompt, "the prompt"))
        if not tokens:
            raise LlamaError(f"the prompt is empty and {self.source} adds no BOS token: there "
                             f"is no token to start from (give a prompt)")
        return tokens

    def first_piece(self, prompt_tokens):
        """What is printed for the prompt's first token: nothing for BOS (run.c never prints the
        token it starts from), the token's bytes for any other (the text's first piece)."""
        first = prompt_tokens[0]
        return b"" if first == self.bos_id else self._text_start(self._pieces[first])

    def piece(self, token, prev_token=None):
        """The bytes printed for token after prev_token: raw, a UTF-8 character can be split over
        tokens. A sentencepiece-style tokenizer's decoder drops the text's first space: the
        piece right after BOS loses it, run.c's rule for Llama 2's tokenizer.bin."""
        piece = self._pieces[token]
        if prev_token is not None and prev_token == self.bos_id:
            return self._text_start(piece)
        return piece

    def _text_start(self, piece):
        if self._strips_first_space and piece[:1] == b" ":
            return piece[1:]
        return piece

    def encode(self, text, bos=True, eos=False):
        """tokenizers' encode(text, add_special_tokens=bos).ids: bos adds what the post-processor
        adds (Llama 3: BOS; SmolLM: nothing). Text given as bytes must be UTF-8."""
        if eos:
            raise ValueError("eos=True: a Hugging Face tokenizer adds only the special tokens its "
                             "post-processor names (bos=True)")
        return self.tokenizer.encode(_text(text, "the text"), add_special_tokens=bool(bos))

    def decode(self, tokens):
        """tokenizers' decode(tokens, skip_special_tokens=False): the pieces joined, invalid UTF-8
        replaced. An id the model has no row for is a ValueError."""
        ids = []
        for token in tokens:
            if not 0 <= token < self.vocab_size:
                raise ValueError(f"token {token} is outside the vocabulary [0, {self.vocab_size})")
            if token < self.tokenizer.vocab_size:
                ids.append(token)
        return self.tokenizer.decode(ids)

"""The Python API around the ports: a model file and its tokenizer loaded once, for Python code
that wants no subprocess. One class serves run (fp32), runq (int8) and run_cuda: each package
names its engine (the module with Transformer, Tokenizer, Sampler, generate and printable)."""
import codecs
import contextlib
import math
import numbers
import threading

from . import LlamaError
from .chat import Conversation, chat_format
from .cli import sampling_overrides, time_seed
from .hf_tokenizer import HFTokenizer


class Model:
    """A model file and its tokenizer, loaded once. The weights are shared, read-only; every
    generate() runs on a run state (KV cache) of its own, so generations may be interleaved or
    run in threads. For your own forward passes, take a Sequence per sequence.

    >>> m = Model("model.bin", "tokenizer.bin")  # or tokenizer.json, tokenizer.model, a folder
    >>> for text in m.generate("Once upon a time", steps=64, temperature=0.0): print(text, end="")
    >>> seq = m.sequence()
    >>> logits = seq.feed(m.encode("Once upon a time"))  # the prompt's tokens together
    >>> logits = seq.forward(int(logits.argmax()))  # then one token at a time
    >>> for text in m.chat([{"role": "user", "content": "Hi"}]): print(text, end="")
    """
    engine = None  # set by each package: run._run, runq._runq

    def __init__(self, checkpoint_path, tokenizer_path="tokenizer.bin"):
        self.transformer = self.make_transformer(checkpoint_path)
        self.config = self.transformer.config
        self.tokenizer = self.engine.load_tokenizer(tokenizer_path, self.config["vocab_size"])
        self._chat_format = None

    def make_transformer(self, checkpoint_path):
        return self.engine.Transformer(checkpoint_path)

    def forward(self, token, pos):
        """Logits for token at position pos on the model's own run state, whose KV cache holds what
        the positions < pos were fed (one thread at a time: another is refused)."""
        return self.transformer.forward(_index("token", token), _index("pos", pos))

    def sequence(self):
        """A new Sequence: a run state (KV cache) and a position of its own on these weights."""
        return Sequence(self)

    def encode(self, text, bos=True, eos=False):
        """Token ids of text, as run.c's encode(); for a Hugging Face tokenizer, as its
        encode(text, add_special_tokens=bos) (eos=True is refused: it adds what it adds)."""
        return self.tokenizer.encode(text, bos, eos)

    def decode(self, tokens):
        """The text that printing tokens one after the other gives (invalid UTF-8 replaced);
        as in run.c, a piece right after BOS (1) loses its leading space. For a Hugging Face
        tokenizer: its decode(tokens, skip_special_tokens=False)."""
        if isinstance(self.tokenizer, HFTokenizer):
            return self.tokenizer.decode([_index("token", token) for token in tokens])
        pieces = []
        for prev, token in zip([-1] + list(tokens), tokens):
            piece = self.tokenizer.decode(prev, _index("token", token))
            pieces.append(piece if self.engine.printable(piece) else b"")
        return b"".join(pieces).decode("utf-8", "replace")

    def generate(self, prompt=None, steps=256, temperature=1.0, topp=0.9, seed=None, stop=None):
        """Yields the generated text piece by piece, exactly what `python -m run` prints.

        steps, temperature, topp and seed mean what -n, -t, -p and -s mean on the command line;
        stop (a string or a list of them) ends the text before the first one it comes to.
        """
        sampler, steps = self._sampler(steps, temperature, topp, seed)
        transformer = self.transformer.with_new_state()  # this generation's own KV cache
        pieces = self.engine.generate(transformer, self.tokenizer, sampler, prompt, steps)
        text = _Text(stop)
        for piece in pieces:
            out = text.add(piece)
            if out:
                yield out
            if text.stopped:
                pieces.close()
                return
        out = text.end()
        if out:
            yield out

    def chat(self, messages, steps=256, temperature=1.0, topp=0.9, seed=None, stop=None):
        """Yields the assistant's reply to messages (a list of {"role": ..., "content": ...}
        dicts: "system", "user", "assistant"), piece by piece.

        The model is fed chat_prompt(messages).ids; the reply ends at an end-of-turn token, at
        stop (as in generate()), or when steps (the positions, prompt included) run out. A
        prompt longer than steps is refused (LlamaError), not answered with an empty reply.
        steps, temperature, topp and seed mean what -n, -t, -p and -s mean on the command line.
        """
        chat = Conversation(self.transformer.with_new_state(), self.chat_format(),
                            *self._sampler(steps, temperature, topp, seed))
        piece = chat.format.printer()
        text = _Text(stop)
        tokens = chat.respond(messages)
        for token in tokens:
            out = text.add(piece(token))
            if out:
                yield out
            if text.stopped:
                tokens.close()
                return
        if chat.unfit:
            raise LlamaError(f"the chat prompt is {chat.unfit} tokens, more than steps={steps}: "
                             f"no position is left for a reply")
        out = text.end()
        if out:
            yield out

    def chat_prompt(self, messages):
        """ChatPrompt(ids, text): the token ids chat(messages) feeds the model before it replies,
        and the text they spell. With a Hugging Face tokenizer, its model's chat template
        rendered as transformers' apply_chat_template(messages, add_generation_prompt=True)
        renders it; with run.c's tokenizer .bin, what run.c's chat loop feeds for the
        conversation (Llama 2's [INST] format, each reply followed by EOS)."""
        return self.chat_format().prompt(messages)

    def chat_format(self):
        """The tokenizer's chat format (llama2_cython.chat): its template, or Llama 2's."""
        if self._chat_format is None:
            self._chat_format = chat_format(self.engine, self.tokenizer)
        return self._chat_format

    def generate_batch(self, prompts, steps=256, temperature=1.0, topp=0.9, seed=None, stop=None):
        """generate() for several prompts together: yields (index, text) pieces as they come.
        Each of steps, temperature, topp, seed and stop is one value for all or a list with one
        per prompt (for stop: None, a string, or a list of strings each). Every pass over the
        weights moves all live sequences on by one token, so many sequences cost little more than
        one; each one's text is what generate() gives it alone, byte for byte."""
        prompts = list(prompts)
        n = len(prompts)

        def each(name, value):
            values = list(value) if isinstance(value, (list, tuple)) else [value] * n
            if len(values) != n:
                raise ValueError(f"{name} has {len(values)} values for {n} prompts")
            return values

        settings = [self._sampler(*args) for args in zip(each("steps", steps), each("temperature", temperature),
                                                          each("topp", topp), each("seed", seed))]
        texts = [_Text(s) for s in each("stop", stop)]
        stopped = set()
        pieces = self.engine.generate_batch(self.transformer, self.tokenizer, [s for s, _ in settings],
                                            prompts, [k for _, k in settings], stopped)
        for i, piece in pieces:
            if i in stopped:
                continue
            out = texts[i].add(piece)
            if out:
                yield i, out
            if texts[i].stopped:
                stopped.add(i)
        for i, text in enumerate(texts):
            out = text.end() if i not in stopped else ""
            if out:
                yield i, out

    def _sampler(self, steps, temperature, topp, seed):
        """(Sampler, steps) as the command line makes them from -n, -t, -p and -s."""
        steps = _index("steps", steps)
        temperature, topp = sampling_overrides(_number("temperature", temperature),
                                               _number("topp", topp))
        seq_len = self.config["seq_len"]
        steps = seq_len if steps <= 0 or steps > seq_len else steps
        seed = time_seed() if not seed else _index("seed", seed) & 0xFFFFFFFFFFFFFFFF
        return self.engine.Sampler(self.config["vocab_size"], temperature, topp, seed), steps


class _Text:
    """Turns a sequence's pieces into text: whole UTF-8 characters only (a character can be split
    over byte tokens), up to the first stop string, holding back what could begin one."""

    def __init__(self, stop):
        self.stops = [stop] if isinstance(stop, str) else [s for s in (stop or []) if s]
        self.utf8 = codecs.getincrementaldecoder("utf-8")("replace")
        self.held = ""
        self.stopped = False

    def add(self, piece):
        if self.stopped:
            return ""
        self.held += self.utf8.decode(piece)
        cut = min((self.held.find(s) for s in self.stops if s in self.held), default=-1)
        if cut >= 0:
            out, self.held, self.stopped = self.held[:cut], "", True
            return out
        keep = max((k for s in self.stops for k in range(1, len(s)) if self.held.endswith(s[:k])),
                   default=0)
        out, self.held = self.held[:len(self.held) - keep], self.held[len(self.held) - keep:]
        return out

    def end(self):
        if self.stopped:
            return ""
        out = self.held + self.utf8.decode(b"", final=True)
        self.held = ""
        cut = min((out.find(s) for s in self.stops if s in out), default=-1)
        return out[:cut] if cut >= 0 else out

class Sequence:
    """One sequence on a Model's shared weights: its own run state (KV cache), allocated once and
    freed with it, and its position. forward(token) feeds the next position. A sequence is used
    by one thread at a time: a second one is refused with RuntimeError, never let in."""

    def __init__(self, model):
        self.model = model
        self.transformer = model.transformer.with_new_state()
        self.pos = 0  # the position the next token goes to
        self._lock = threading.Lock()

    def forward(self, token):
        """The logits after token, fed at position pos (which then advances)."""
        token = _index("token", token)
        if not self._lock.acquire(blocking=False):
            raise RuntimeError("this Sequence is in use by another thread: give each thread its own")
        try:
            if self.pos >= self.model.config["seq_len"]:
                raise ValueError(f"the sequence is full: seq_len is {self.model.config['seq_len']}")
            logits = self.transformer.forward(token, self.pos)
            self.pos += 1
            return logits
        finally:
            self._lock.release()

    def feed(self, tokens):
        """The logits after the last of tokens, fed at positions pos, pos + 1, ... together (the
        batched forward: a prompt at the compute speed); the KV cache then holds them all."""
        tokens = [_index("token", t) for t in tokens]
        if not tokens:
            raise ValueError("no tokens to feed")
        if not self._lock.acquire(blocking=False):
            raise RuntimeError("this Sequence is in use by another thread: give each thread its own")
        try:
            if self.pos + len(tokens) > self.model.config["seq_len"]:
                raise ValueError(f"{len(tokens)} tokens from position {self.pos} overflow the "
                                 f"sequence: seq_len is {self.model.config['seq_len']}")
            logits = self.transformer.forward_prompt(tokens, self.pos)
            self.pos += len(tokens)
            return logits
        finally:
            self._lock.release()


def _index(name, value):
    # 5.7 would silently run token 5; a bool is no token either
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    return int(value)


def _number(name, value):
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or math.isnan(value):
        raise ValueError(f"{name} must be a number, got {value!r}")
    return float(value)


@contextlib.contextmanager
def exclusive_state(transformer):
    """Runs the body with transformer's run state (KV cache) to itself, or refuses at once: two
    threads or two interleaved generations on one state would corrupt each other's numbers
    without a word. (Transformers that are not run's or runq's bring no lock: nothing to hold.)"""
    lock = getattr(transformer, "state_lock", None)
    if lock is None:
        yield
        return
    if not lock.acquire(blocking=False):
        raise RuntimeError("this Transformer's run state (KV cache) is in use by another forward() "
                           "or generation; give each sequence or thread its own: Model.sequence(), "
                           "Transformer.with_new_state()")
    try:
        yield
    finally:
        lock.release()

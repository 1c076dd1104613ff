"""The Python API around the ports: a model file and its tokenizer loaded once, for Python code
that wants no subprocess. One class serves run (fp32), runq (int8) and run_cuda: each package
names its engine (the module with Transformer, Tokenizer, Sampler, generate and printable)."""
import codecs
import math
import numbers

from .cli import sampling_overrides, time_seed


class Model:
    """A model file and its tokenizer, loaded once.

    >>> m = Model("model.bin", "tokenizer.bin")
    >>> logits = m.forward(1, 0)  # numpy float32 array of vocab_size
    >>> ids = m.encode("Once upon a time")
    >>> for text in m.generate("Once upon a time", steps=64, temperature=0.0): print(text, end="")
    """
    engine = None  # set by each package: run._run, runq._runq

    def __init__(self, checkpoint_path, tokenizer_path="tokenizer.bin"):
        self.transformer = self.make_transformer(checkpoint_path)
        self.config = self.transformer.config
        self.tokenizer = self.engine.Tokenizer(tokenizer_path, self.config["vocab_size"])

    def make_transformer(self, checkpoint_path):
        return self.engine.Transformer(checkpoint_path)

    def forward(self, token, pos):
        """Logits for token at position pos (the KV cache holds positions < pos)."""
        return self.transformer.forward(_index("token", token), _index("pos", pos))

    def encode(self, text, bos=True, eos=False):
        """Token ids of text, as run.c's encode()."""
        return self.tokenizer.encode(text, bos, eos)

    def decode(self, tokens):
        """The text that printing tokens one after the other gives (invalid UTF-8 replaced);
        as in run.c, a piece right after BOS (1) loses its leading space."""
        pieces = []
        for prev, token in zip([-1] + list(tokens), tokens):
            piece = self.tokenizer.decode(prev, _index("token", token))
            pieces.append(piece if self.engine.printable(piece) else b"")
        return b"".join(pieces).decode("utf-8", "replace")

    def generate(self, prompt=None, steps=256, temperature=1.0, topp=0.9, seed=None):
        """Yields the generated text piece by piece, exactly what `python -m run` prints.

        steps, temperature, topp and seed mean what -n, -t, -p and -s mean on the command line.
        """
        steps = _index("steps", steps)
        temperature, topp = sampling_overrides(_number("temperature", temperature),
                                               _number("topp", topp))
        seq_len = self.config["seq_len"]
        steps = seq_len if steps <= 0 or steps > seq_len else steps
        seed = time_seed() if not seed else _index("seed", seed) & 0xFFFFFFFFFFFFFFFF
        sampler = self.engine.Sampler(self.config["vocab_size"], temperature, topp, seed)
        # a UTF-8 character can be split over byte tokens: yield whole characters only
        utf8 = codecs.getincrementaldecoder("utf-8")("replace")
        for piece in self.engine.generate(self.transformer, self.tokenizer, sampler, prompt, steps):
            text = utf8.decode(piece)
            if text:
                yield text
        text = utf8.decode(b"", final=True)
        if text:
            yield text


def _index(name, value):
    # 5.7 would silently run token 5; a bool is no token either
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    return int(value)


def _number(name, value):
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or math.isnan(value):
        raise ValueError(f"{name} must be a number, got {value!r}")
    return float(value)

"""llama2.c's run.c in Cython: `python -m run model.bin [options]`, or the Python API below."""
from llama2_cython import LlamaError
from llama2_cython.api import Model as _Model

from . import _run
from ._run import (Sampler, Tokenizer, Transformer, chat, generate, generate_batch,
                   load_tokenizer, main, time_in_ms)


class Model(_Model):
    __doc__ = _Model.__doc__
    engine = _run


__all__ = ["LlamaError", "Model", "Sampler", "Tokenizer", "Transformer", "chat", "generate",
           "generate_batch", "load_tokenizer", "main", "time_in_ms"]

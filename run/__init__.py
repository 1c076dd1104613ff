"""llama2.c's run.c in Cython: `python -m run model.bin [options]`, or the Python API below."""
from ._run import (LlamaError, Model, Sampler, Tokenizer, Transformer, chat, generate, main,
                   time_in_ms)

__all__ = ["LlamaError", "Model", "Sampler", "Tokenizer", "Transformer", "chat", "generate",
           "main", "time_in_ms"]

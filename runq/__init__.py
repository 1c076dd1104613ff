"""llama2.c's runq.c (int8 Q8_0 inference) in Cython: `python -m runq model_q80.bin [options]`, or
the Python API below."""
from ._runq import (LlamaError, Model, Sampler, Tokenizer, Transformer, chat, generate, main,
                    time_in_ms)

__all__ = ["LlamaError", "Model", "Sampler", "Tokenizer", "Transformer", "chat", "generate",
           "main", "time_in_ms"]

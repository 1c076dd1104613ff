"""llama2.c's runq.c (int8 Q8_0 inference) in Cython: `python -m runq model_q80.bin [options]`, or
the Python API below."""
from llama2_cython import LlamaError
from llama2_cython.api import Model as _Model

from . import _runq
from ._runq import (INT8_KERNEL, Sampler, Tokenizer, Transformer, chat, generate, generate_batch,
                    int8_batch_kernel, load_tokenizer, main, time_in_ms)


class Model(_Model):
    __doc__ = _Model.__doc__.replace("model.bin", "model_q80.bin")
    engine = _runq


__all__ = ["INT8_KERNEL", "LlamaError", "Model", "Sampler", "Tokenizer", "Transformer", "chat",
           "generate", "generate_batch", "int8_batch_kernel", "load_tokenizer", "main", "time_in_ms"]

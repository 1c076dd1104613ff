"""What run.pyx, runq.pyx, run_cuda.py and the tools share that has no twin in llama2.c's C: the
error type (here), the model file formats (formats), the command line around main() (cli) and the
Python API (api)."""


class LlamaError(Exception):
    """A bad model file, tokenizer file or argument: the message is one line for the user."""

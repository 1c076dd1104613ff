# Included by run.pyx and runq.pyx (written once, as it has no twin in the C): run.c's printf and
# fflush to stdout, with the write errors that C ignores turned into exceptions for main; the
# printing side of generate() (print_generation), safe_printf's test for the Python API, and the
# writer of llama2_cython.chat's loop.
from libc.errno cimport errno, EIO, EPIPE
from libc.stdio cimport fflush, fwrite, stdout

import os as _os
import sys as _sys

cdef void write_stdout(const char* data, size_t n) except *:
    # a closed pipe (`| head`) raises BrokenPipeError (main stops quietly), any other error (a
    # full disk, a closed stdout) an OSError that main reports
    if n and fwrite(data, 1, n, stdout) != n:
        raise_stdout_error()

cdef void flush_stdout() except *:
    if fflush(stdout) != 0:
        raise_stdout_error()

cdef void raise_stdout_error() except *:
    cdef int error = errno or EIO
    if error == EPIPE:
        raise BrokenPipeError(error, _os.strerror(error), "<stdout>")
    raise OSError(error, _os.strerror(error), "<stdout>")

def write_and_flush(bytes data):
    # printf and fflush for llama2_cython.chat's loop: the stdout run.c's own loops print to
    write_stdout(data, len(data))
    flush_stdout()

def flush_quietly():
    # what main flushes before it reports Ctrl-C: whatever can still be written
    fflush(stdout)

def printable(bytes piece):
    """Whether safe_printf prints piece (the Python API's filter)."""
    return printable_piece(piece)

def print_generation(pieces):
    """What run.c's generate() prints, from generate()'s pieces: each piece as it comes, a newline,
    and the tok/s on stderr (with, apart, the prompt tokens that went through the model together)."""
    cdef bytes piece
    while True:
        try:
            piece = next(pieces)
        except StopIteration as done:
            tok_per_s, prefilled, prefill_tok_per_s = done.value
            break
        # the pieces generate() yields are the ones to print (run.c's Tokenizer: safe_printf's test
        # passed, no NUL; a Hugging Face tokenizer's raw bytes)
        write_stdout(piece, len(piece))
        flush_stdout()
        # forward() runs in C without the eval loop: look for Ctrl-C once a token
        PyErr_CheckSignals()
    write_stdout(b"\n", 1)
    flush_stdout()
    if tok_per_s is not None:
        _sys.stderr.write("achieved tok/s: %f" % tok_per_s)
        if prefilled:
            _sys.stderr.write(" (after a prompt of %d tokens fed together at %f tok/s)"
                              % (prefilled, prefill_tok_per_s))
        _sys.stderr.write("\n")
    elif prefilled:
        # no token went one at a time after the first (-n within the prompt): the prompt's rate
        _sys.stderr.write("achieved tok/s: %f (a prompt of %d tokens fed together)\n"
                          % (prefill_tok_per_s, prefilled))

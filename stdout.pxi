# Included by run.pyx and runq.pyx (written once, as it has no twin in the C): run.c's printf and
# fflush to stdout, with the write errors that C ignores turned into exceptions for main.
from libc.errno cimport errno, EIO, EPIPE
from libc.stdio cimport fflush, fwrite, stdout

import os as _os

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

def flush_quietly():
    # what main flushes before it reports Ctrl-C: whatever can still be written
    fflush(stdout)

"""Files that are never half-written.

atomic_write(path) gives a file to write path's new content into: the bytes go to a temporary file
in path's directory, which is flushed, fsync'ed and renamed over path only once the writer is done.
Until then path keeps its old content (a process that has it mapped keeps its old inode), and a
failure or a signal removes the temporary file; only SIGKILL can leave it behind, under a name of
its own (".NAME.XXXXXXXX.tmp").
(llama2_cython.cli.run_command makes SIGTERM and SIGHUP unwind like Ctrl-C, so that the
temporary file is removed then too.)
"""
import contextlib
import errno
import os
import secrets
import stat

def _note(error, text):
    """Attach text to error (Python 3.11's add_note; an attribute of the same name before it)."""
    if hasattr(error, "add_note"):
        error.add_note(text)
    else:
        error.__notes__ = [*getattr(error, "__notes__", []), text]


def _named(error, path, temporary=None):
    """error as an OSError naming path when it names no file or the temporary one."""
    if isinstance(error, OSError) and error.filename in (None, temporary) and error.errno:
        return OSError(error.errno, error.strerror or os.strerror(error.errno), os.fspath(path))
    return error


def _create_temporary(directory, name):
    """(path, fd) of a new file in directory, with the permissions a new file there would get
    (0666 less the umask, as open() gives, unlike mkstemp's 0600)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0) \
        | getattr(os, "O_CLOEXEC", 0)
    while True:
        temporary = os.path.join(directory, f".{name[:200]}.{secrets.token_hex(4)}.tmp")
        try:
            return temporary, os.open(temporary, flags, 0o666)
        except FileExistsError:
            continue


def _fsync_directory(directory):
    """Make the rename itself durable; not every system can open or fsync a directory."""
    with contextlib.suppress(OSError, AttributeError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_write(path):
    """A binary file object whose content replaces path's when the with-block ends normally.

    If the block raises (an error, KeyboardInterrupt, cli.Terminated), path is left as it was and the
    temporary file removed; OSErrors that name no file (ENOSPC, EFBIG under `ulimit -f`) are
    raised naming path. A symbolic link is written through (its target is replaced, the link
    kept); the old file's permission bits are kept. Devices and FIFOs (/dev/null, /dev/stdout)
    cannot be replaced: they are written directly.
    """
    target = os.path.realpath(path)
    try:
        old = os.stat(target)
    except FileNotFoundError:
        old = None
    except OSError as e:
        raise _named(e, path, target) from None
    if old is not None and stat.S_ISDIR(old.st_mode):
        raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), os.fspath(path))
    if old is not None and not stat.S_ISREG(old.st_mode):
        try:
            with open(target, "wb") as fh:
                yield fh
        except BaseException as e:
            raise _named(e, path, target) from None
        return

    directory, name = os.path.split(target)
    try:
        temporary, fd = _create_temporary(directory, name)
    except OSError as e:
        raise _named(e, path, e.filename) from None  # the file it names is the temporary one
    fh = None
    try:
        if old is not None:
            os.fchmod(fd, stat.S_IMODE(old.st_mode))
        fh = os.fdopen(fd, "wb")
        yield fh
        fh.flush()
        os.fsync(fh.fileno())
        fh.close()
        os.replace(temporary, target)
    except BaseException as e:
        if fh is None:
            os.close(fd)
        else:
            with contextlib.suppress(OSError):
                fh.close()  # a failing flush of the rest still closes the descriptor
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        error = _named(e, path, temporary)
        _note(error, f"{os.fspath(path)} {'left as it was' if old else 'not written'}")
        raise error from None
    _fsync_directory(directory)

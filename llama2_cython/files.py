"""Files that are never half-written, and command-line tools that end in one line.

atomic_write(path) gives a file to write path's new content into: the bytes go to a temporary file
in path's directory, which is flushed, fsync'ed and renamed over path only once the writer is done.
Until then path keeps its old content (a process that has it mapped keeps its old inode), and a
failure or a signal removes the temporary file; only SIGKILL can leave it behind, under a name of
its own (".NAME.XXXXXXXX.tmp").

run_command(prog, main) runs a tool's main() so that SIGTERM and SIGHUP unwind like Ctrl-C does
(writers clean up), and a signal or a stdout that cannot be written ends with one line on stderr
and the usual status (128 + the signal; 141, quietly, for a closed pipe).
"""
import contextlib
import errno
import os
import secrets
import signal
import stat
import sys

# signals that end a tool by default: raised as exceptions while run_command runs, so that
# `finally` blocks (atomic_write's cleanup) run before the tool exits
_TERMINATING = {"SIGTERM": "terminated", "SIGHUP": "hung up"}


class Terminated(BaseException):
    """SIGTERM or SIGHUP, raised like KeyboardInterrupt is for SIGINT."""

    def __init__(self, signum):
        super().__init__(signum)
        self.signum = signum


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

    If the block raises (an error, KeyboardInterrupt, Terminated), path is left as it was and the
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


def _raise_terminated(signum, frame):
    raise Terminated(signum)


def _quiet_stdout():
    """Point stdout at devnull, so that the flush at exit cannot fail again and print more."""
    with contextlib.suppress(OSError, ValueError, AttributeError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)


def run_command(prog, main, argv=None):
    """main(argv) -> exit status, run as the command prog. main reports its own errors; here:
    Ctrl-C ends with "prog: interrupted" and 130, SIGTERM with "prog: terminated" and 143,
    SIGHUP with 129 (each line saying which files were left as they were), a stdout that cannot
    be written (or an OSError main let through) with one line and 1, a closed stdout pipe quietly
    with 141."""
    handlers = {}
    for name in _TERMINATING:
        signum = getattr(signal, name, None)
        # a signal ignored by whoever started us (nohup) stays ignored
        if signum is not None and signal.getsignal(signum) == signal.SIG_DFL:
            handlers[signum] = signal.signal(signum, _raise_terminated)
    try:
        status = main(argv)
        sys.stdout.flush()
        return status
    except (KeyboardInterrupt, Terminated) as e:
        if isinstance(e, KeyboardInterrupt):
            what, status = "interrupted", 128 + signal.SIGINT
        else:
            what, status = _TERMINATING[signal.Signals(e.signum).name], 128 + e.signum
        notes = getattr(e, "__notes__", [])
        print(f"{prog}: {what}{': ' if notes else ''}{', '.join(notes)}", file=sys.stderr)
        return status
    except BrokenPipeError:
        _quiet_stdout()
        return 128 + 13  # SIGPIPE, as a C tool writing to `| head` ends
    except OSError as e:
        # errors of the files a tool writes name them (atomic_write sees to it); one that names
        # no file is stdout's (a full disk, a closed descriptor)
        if e.filename is None:
            _quiet_stdout()
        print(f"{prog}: error: {e.filename or 'stdout'}: {e.strerror or e}", file=sys.stderr)
        return 1
    finally:
        for signum, handler in handlers.items():
            signal.signal(signum, handler)

"""The command line around run.c's main(), for `python -m run`, `python -m runq` and
`python run_cuda.py`: the flags, the usage text under the program's own name and reading stdin;
and, for those and the tools (export.py, tokenizer.py, train.py), the mapping from errors and
signals to one line on stderr and an exit status (ExitStatus, run_command). main() itself, with
run.c's flow, stays in each .pyx file."""
import contextlib
import math
import os
import re
import signal
import sys
import time

from . import LlamaError

COMMANDS = {"run": "python -m run", "runq": "python -m runq", "run_cuda": "python run_cuda.py"}
EXAMPLE_MODELS = {"runq": "model_q80.bin"}

USAGE = """\
Usage:   {command} <checkpoint> [options]
Example: {command} {model} -n 256 -i "Once upon a time"
Options:
  -t <float>  temperature in [0,inf], default 1.0
  -p <float>  p value in top-p (nucleus) sampling in [0,1] default 0.9
  -s <int>    random seed, default time(NULL)
  -n <int>    number of steps to run for, default 256. 0 = max_seq_len
  -i <string> input prompt
  -z <string> optional path to custom tokenizer
  -m <string> mode: generate|chat, default: generate
  -y <string> system prompt in chat mode, default: none
"""


def usage(prog):
    return USAGE.format(command=COMMANDS.get(prog, prog), model=EXAMPLE_MODELS.get(prog, "model.bin"))


class UsageError(Exception):
    """Bad command line: main prints the message (if any) and the usage text."""


_INT = re.compile(r"\s*[+-]?\d+\s*\Z")


def parse_float(flag, text):
    # run.c's atof turns "abc" into 0.0 silently; a value that is not a number is refused
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if math.isnan(value):
        raise UsageError(f"{flag} expects a number, got {text!r}")
    return value


def parse_int(flag, text):
    # run.c's atoi: decimal int, refused (instead of silently 0) when it is not one
    if not _INT.match(text) or not -2**31 <= int(text) < 2**31:
        raise UsageError(f"{flag} expects an integer, got {text!r}")
    return int(text)


def parse_args(argv):
    """run.c's main() argument handling; returns the settings as a dict."""
    # default parameters
    args = dict(checkpoint_path=None, tokenizer_path="tokenizer.bin", temperature=1.0, topp=0.9,
                steps=256, prompt=None, rng_seed=0, mode="generate", system_prompt=None)
    # poor man's C argparse so we can override the defaults above from the command line
    if len(argv) >= 2:
        args["checkpoint_path"] = argv[1]
    else:
        raise UsageError()
    for i in range(2, len(argv), 2):
        # do some basic validation
        if i + 1 >= len(argv):
            raise UsageError(f"{argv[i]} needs a value")  # must have arg after flag
        if argv[i][:1] != "-":
            raise UsageError(f"expected a flag, got {argv[i]!r}")  # must start with dash
        if len(argv[i]) != 2:
            raise UsageError(f"unknown flag {argv[i]!r}")  # must be -x (one dash, one letter)
        flag, value = argv[i], argv[i + 1]
        # read in the args
        if flag == "-t":
            args["temperature"] = parse_float(flag, value)
        elif flag == "-p":
            args["topp"] = parse_float(flag, value)
        elif flag == "-s":
            # atoi's int lands in an unsigned long long, so -1 is 2^64-1 as in run.c
            args["rng_seed"] = parse_int(flag, value) & 0xFFFFFFFFFFFFFFFF
        elif flag == "-n":
            args["steps"] = parse_int(flag, value)
        elif flag == "-i":
            args["prompt"] = os.fsencode(value)  # the bytes the user typed
        elif flag == "-z":
            args["tokenizer_path"] = value
        elif flag == "-m":
            args["mode"] = value
        elif flag == "-y":
            args["system_prompt"] = os.fsencode(value)
        else:
            raise UsageError(f"unknown flag {flag!r}")

    # parameter validation/overrides
    if args["rng_seed"] <= 0:
        args["rng_seed"] = time_seed()
    args["temperature"], args["topp"] = sampling_overrides(args["temperature"], args["topp"])
    if args["steps"] < 0:
        args["steps"] = 0
    if args["mode"] not in ("generate", "chat"):
        raise UsageError(f"unknown mode: {args['mode']}")
    return args


def time_seed():
    """run.c's (unsigned int)time(NULL)."""
    return int(time.time()) & 0xFFFFFFFF


def sampling_overrides(temperature, topp):
    """run.c's overrides: a negative temperature is 0 (greedy), a top-p outside [0, 1] is 0.9."""
    if temperature < 0.0:
        temperature = 0.0
    if topp < 0.0 or 1.0 < topp:
        topp = 0.9
    return temperature, topp


def read_line():
    """A line of stdin without its newline; None at the end of input or when there is no stdin.
    run.c reads into a fixed 512-byte buffer with fgets, splitting longer lines; here a line is a
    line, whatever its length. A C string ends at the first NUL: so does the line."""
    if sys.stdin is None:  # started with stdin closed (<&-)
        return None
    line = sys.stdin.buffer.readline()
    if not line:
        return None
    if line.endswith(b"\n"):
        line = line[:-1]  # strip newline
    return line.split(b"\0", 1)[0]


class Terminated(BaseException):
    """SIGTERM or SIGHUP, raised like KeyboardInterrupt is for SIGINT (see run_command)."""

    def __init__(self, signum):
        super().__init__(signum)
        self.signum = signum


# signals that end a tool by default, and what the line on stderr says of them
TERMINATING = {"SIGTERM": "terminated", "SIGHUP": "hung up"}


class ExitStatus:
    """A main()'s errors as one line on stderr and an exit status (a Python traceback is no answer
    to a user's bad file or flag):

        with ExitStatus(prog, flush_stdout) as status:
            ...  # main's body
        return status.code
    """

    def __init__(self, prog, flush_stdout=None):
        self.prog = prog
        self.flush_stdout = flush_stdout  # C's fflush(stdout), for the output printed so far
        self.code = 0

    def __enter__(self):
        return self

    def say(self, message):
        sys.stderr.write(f"{self.prog}: {message}\n")

    def __exit__(self, kind, error, tb):
        if kind is None:
            return False
        if issubclass(kind, UsageError):
            if error.args and error.args[0]:
                self.say(error.args[0])
            sys.stderr.write(usage(self.prog))
            self.code = 1
        elif issubclass(kind, (LlamaError, ValueError)):
            self.say(error)
            self.code = 1
        elif issubclass(kind, MemoryError):
            self.say(f"out of memory{': ' + str(error) if str(error) else ''}")
            self.code = 1
        elif issubclass(kind, BrokenPipeError):
            # the reader went away (`| head`): stop quietly, as a C program killed by SIGPIPE would;
            # stdout now goes to devnull so that no flush at exit (libc's or Python's) complains
            # (https://docs.python.org/3/library/signal.html#note-on-sigpipe)
            quiet_stdout()
            self.code = 128 + signal.SIGPIPE  # 141, the status of `./run | head` in C
        elif issubclass(kind, OSError):
            # a file a tool writes is named (atomic_write sees to it); an error that names none,
            # or "<stdout>", is stdout's: a full disk (ENOSPC) or a closed stdout (EBADF)
            if error.filename in (None, "<stdout>"):
                quiet_stdout()
                self.say(f"error writing standard output: {error.strerror or error}")
            else:
                self.say(f"error: {error.filename}: {error.strerror or error}")
            self.code = 1
        elif issubclass(kind, (KeyboardInterrupt, Terminated)):
            if self.flush_stdout is not None:
                self.flush_stdout()
            if issubclass(kind, KeyboardInterrupt):
                what, self.code = "interrupted", 128 + signal.SIGINT
            else:
                what = TERMINATING[signal.Signals(error.signum).name]
                self.code = 128 + error.signum
            # what an interrupted writer left (atomic_write notes it: "out.bin left as it was")
            notes = getattr(error, "__notes__", [])
            sys.stderr.write(f"\n{self.prog}: {what}{': ' if notes else ''}{', '.join(notes)}\n")
        else:
            return False
        return True


def run_command(prog, main, argv=None):
    """main(argv) -> exit status, run as the command prog under ExitStatus, with SIGTERM and
    SIGHUP raised as Terminated (so that writers clean up, as on Ctrl-C) while it runs."""
    handlers = {}
    for name in TERMINATING:
        signum = getattr(signal, name, None)
        # a signal ignored by whoever started us (nohup) stays ignored
        if signum is not None and signal.getsignal(signum) == signal.SIG_DFL:
            handlers[signum] = signal.signal(signum, _raise_terminated)
    try:
        with ExitStatus(prog) as status:
            status.code = main(argv)
            sys.stdout.flush()
        return status.code
    finally:
        for signum, handler in handlers.items():
            signal.signal(signum, handler)


def _raise_terminated(signum, frame):
    raise Terminated(signum)


def quiet_stdout():
    """Point stdout at devnull, so that the flush at exit cannot fail again and print more."""
    with contextlib.suppress(OSError, ValueError, AttributeError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.close(devnull)

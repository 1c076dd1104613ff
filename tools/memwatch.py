"""Runs a command and reports its peak memory and its time: how the README's conversion figures
were measured.

    python -m tools.memwatch [--every SECONDS] -- COMMAND [ARGS...]

Samples /proc/PID/status every --every seconds (default 0.02) while COMMAND runs, and prints on
stderr, after it ends: the wall time, the peak of RssAnon (anonymous memory: what the process
allocated, the figure a converter must bound) and the peak of VmRSS (which also counts the pages
of mapped files, reclaimable page cache), and the kernel's own VmHWM (peak VmRSS, exact). Linux
only. Exits with COMMAND's status.
"""
import argparse
import subprocess
import sys
import time


def status_kib(pid, fields):
    """{field: KiB} from /proc/PID/status; {} once the process is gone."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            lines = fh.read().splitlines()
    except OSError:
        return {}
    values = {}
    for line in lines:
        name, _, rest = line.partition(":")
        if name in fields:
            values[name] = int(rest.split()[0])
    return values


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--every", type=float, default=0.02, help="seconds between samples")
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command to run")
    start = time.perf_counter()
    proc = subprocess.Popen(command)
    peak = {"RssAnon": 0, "VmRSS": 0, "VmHWM": 0}
    while proc.poll() is None:
        for name, value in status_kib(proc.pid, peak).items():
            peak[name] = max(peak[name], value)
        time.sleep(args.every)
    seconds = time.perf_counter() - start
    print(f"memwatch: {seconds:.1f} s, peak RssAnon {peak['RssAnon'] / 2**20:.2f} GiB, peak VmRSS "
          f"{peak['VmRSS'] / 2**20:.2f} GiB (VmHWM {peak['VmHWM'] / 2**20:.2f} GiB), exit status "
          f"{proc.returncode}", file=sys.stderr)
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())

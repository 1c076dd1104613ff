#!/usr/bin/env python3
"""`python export.py OUT.bin ...` from the repo, as upstream's export.py is run: writes llama2.c
model files (llama2_cython/export.py says how; installed, the command is llama2-export)."""
import sys

from llama2_cython.export import command

if __name__ == "__main__":
    sys.exit(command())

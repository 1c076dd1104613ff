#!/usr/bin/env python3
"""`python tokenizer.py -t tok.model` from the repo, as upstream's tokenizer.py is run: writes the
tokenizer .bin that run.c reads (llama2_cython/tokenizer.py says how; installed, the command is
llama2-tokenizer)."""
import sys

from llama2_cython.tokenizer import command

if __name__ == "__main__":
    sys.exit(command())

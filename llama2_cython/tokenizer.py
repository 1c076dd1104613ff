#!/usr/bin/env python3
"""Export a sentencepiece tokenizer model to the tokenizer .bin that run.c reads.

    python tokenizer.py -t path/to/tok.model [-o OUT.bin]    (OUT defaults to path/to/tok.bin)

The format (little-endian): uint32 max_token_length, then for each token id in order: float32
score, int32 length in bytes, the piece's UTF-8 bytes. Pieces are stored the way run.c prints
them: sentencepiece's word-start mark '\u2581' becomes a space, BOS is "\\n<s>\\n" and EOS
"\\n</s>\\n". sentencepiece is imported only to read the model.
"""
import argparse
import os
import struct
import sys

from llama2_cython.cli import run_command
from llama2_cython.files import atomic_write


class TokenizerError(Exception):
    """Bad input; the CLI prints the message as one line and exits with status 1."""


def write_tokenizer(path, pieces, scores):
    """Write pieces (str) with their scores in run.c's tokenizer format; path is replaced only
    by a complete file (an error or a signal part-way leaves it as it was)."""
    encoded = [piece.encode("utf-8") for piece in pieces]
    with atomic_write(path) as fh:
        fh.write(struct.pack("<I", max((len(b) for b in encoded), default=0)))
        for data, score in zip(encoded, scores):
            fh.write(struct.pack("<fi", score, len(data)))
            fh.write(data)


def sentencepiece_vocab(model_path):
    """(pieces, scores) of a sentencepiece .model, pieces spelled as run.c wants them."""
    try:
        import sentencepiece
    except ImportError:
        raise TokenizerError("reading a .model needs sentencepiece (pip install sentencepiece)") \
            from None
    if not os.path.isfile(model_path):
        raise TokenizerError(f"{model_path}: no such file")
    try:
        sp = sentencepiece.SentencePieceProcessor(model_file=str(model_path))
    except (OSError, RuntimeError) as e:
        reason = " ".join(str(e).split())  # sentencepiece's messages can span lines
        raise TokenizerError(f"{model_path}: not a sentencepiece model ({reason})") from None
    pieces, scores = [], []
    for i in range(sp.get_piece_size()):
        if i == sp.bos_id():
            piece = "\n<s>\n"
        elif i == sp.eos_id():
            piece = "\n</s>\n"
        else:
            piece = sp.id_to_piece(i)
        pieces.append(piece.replace("\u2581", " "))
        scores.append(sp.get_score(i))
    return pieces, scores


def export_tokenizer(model_path, out_path=None):
    """Write model_path's vocabulary to out_path (default: model_path with .bin for its
    extension); returns out_path."""
    if out_path is None:
        out_path = os.path.splitext(model_path)[0] + ".bin"
    write_tokenizer(out_path, *sentencepiece_vocab(model_path))
    return out_path


def main(argv=None):
    parser = argparse.ArgumentParser(
        description="Export a sentencepiece .model to llama2.c's tokenizer .bin format.")
    parser.add_argument("-t", "--tokenizer-model", default="tokenizer.model",
                        help="the sentencepiece model (default: tokenizer.model)")
    parser.add_argument("-o", "--output", help="the output file (default: the model's path with "
                                               ".bin for its extension)")
    args = parser.parse_args(argv)
    try:
        out_path = export_tokenizer(args.tokenizer_model, args.output)
    except TokenizerError as e:
        print(f"tokenizer.py: error: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        where = f"{e.filename}: " if e.filename else ""
        print(f"tokenizer.py: error: {where}{e.strerror or e}", file=sys.stderr)
        return 1
    print(f"wrote {out_path}")
    return 0


def command(argv=None):
    """The command line: `python tokenizer.py` in the repo, `llama2-tokenizer` once installed."""
    return run_command(os.path.basename(sys.argv[0]) or "tokenizer.py", main, argv)


if __name__ == "__main__":
    sys.exit(command())

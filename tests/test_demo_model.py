"""The shipped demo model (demo/, made by demo/train.py): it writes the corpus's words, run and runq
agree on it, and the model card's command makes a model of the same shape."""
import difflib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from demo import corpus
import run

REPO = Path(__file__).resolve().parent.parent
MODELS = REPO / "demo"
V0, Q80 = MODELS / "stories_demo.bin", MODELS / "stories_demo_q80.bin"
TOK = MODELS / "stories_tok.bin"
SEED, STORIES = 0, 20000  # demo/train.py's defaults, as in demo/README.md
# One OpenMP thread: on a busy 2-core machine, a second thread that waits at every barrier makes
# the model's tiny matmuls many times slower.
ENV = dict(os.environ, OMP_NUM_THREADS="1")


def generate(module, model, *args):
    cmd = [sys.executable, "-m", module, str(model), "-z", str(TOK), "-t", "0", "-n", "200",
           *map(str, args)]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=60, env=ENV)
    assert out.returncode == 0, out.stderr
    return out.stdout


@pytest.mark.parametrize("prompt", [[], ["-i", "Once upon a time"], ["-i", "Tom went to the"]])
def test_greedy_text_is_made_of_corpus_words(prompt):
    vocab = corpus.vocabulary(SEED, STORIES)
    text = generate("run", V0, *prompt)
    words = corpus.words(text)
    assert len(words) >= 20, text
    known = sum(w in vocab for w in words)
    assert known / len(words) >= 0.9, (known, len(words), text)


@pytest.mark.parametrize("prompt", [[], ["-i", "Lucy had a"], ["-i", "Tom went to the"]])
def test_run_and_runq_agree(prompt):
    """Greedy fp32 and Q8_0 texts: a common start, then mostly the same words (a near-tie between
    two names can flip under int8 rounding, after which the stories still run alike)."""
    a, b = generate("run", V0, *prompt), generate("runq", Q80, *prompt)
    prefix = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    assert prefix >= min(40, len(a)), (a, b)
    ratio = difflib.SequenceMatcher(None, corpus.words(a), corpus.words(b)).ratio()
    assert ratio >= 0.8, (ratio, a, b)


LOGITS = """
import json, sys
import numpy as np
import run, runq
fp32, q80 = run.Transformer(sys.argv[1]), runq.Transformer(sys.argv[2])
assert fp32.config == q80.config, (fp32.config, q80.config)
rows = []
for pos, tok in enumerate(json.loads(sys.argv[3])):
    a, b = fp32.forward(tok, pos), q80.forward(tok, pos)
    rows.append([float(np.abs(a - b).max()), float(np.abs(a).max()), int(np.argmax(a)),
                 int(np.argmax(b)), float(a.max() - a[np.argmax(b)])])
print(json.dumps(rows))
"""


def test_run_and_runq_logits_close():
    """Q8_0 logits within int8 tolerance of fp32 ones (in a child with one OpenMP thread)."""
    tokens = [1, 400, 300, 42, 7, 100, 256, 511, 3, 77, 1, 290, 333]
    out = subprocess.run([sys.executable, "-c", LOGITS, str(V0), str(Q80), json.dumps(tokens)],
                         cwd=REPO, capture_output=True, text=True, timeout=60, env=ENV)
    assert out.returncode == 0, out.stderr
    for pos, (diff, scale, top_a, top_b, gap) in enumerate(json.loads(out.stdout)):
        assert diff <= 0.05 * scale, (pos, diff, scale)
        assert top_a == top_b or gap <= 0.02 * scale, (pos, top_a, top_b, gap)


def test_card_command_reproduces_shape(tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("sentencepiece")
    card = (MODELS / "README.md").read_text()
    assert "python -m demo.train --out demo/ --seed 0" in card
    cmd = [sys.executable, "-m", "demo.train", "--out", str(tmp_path), "--seed", "0", "--steps", "3",
           "--stories", "2000", "--eval-every", "1000"]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120, env=ENV)
    assert out.returncode == 0, out.stdout + out.stderr
    for name, header in (("stories_demo.bin", 28), ("stories_demo_q80.bin", 256)):
        new, shipped = tmp_path / name, MODELS / name
        assert new.read_bytes()[:header] == shipped.read_bytes()[:header], name
        assert new.stat().st_size == shipped.stat().st_size, name
    assert run.Transformer(str(tmp_path / "stories_demo.bin")).config == \
        run.Transformer(str(V0)).config
    assert (tmp_path / "stories_tok.bin").exists()

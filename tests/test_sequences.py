"""One model, many sequences (issue 11): the mapped weights are shared, every generation and every
Sequence has a run state (KV cache) of its own, so interleaved generators and threads give exactly
the results of serial runs, and a state used from two places at once is refused, never corrupted."""
import threading

import numpy as np
import pytest

import run
import runq
from tests.helpers import BUILDS, TESTDATA, in_build

TOK = TESTDATA / "tok512.bin"
PACKAGES = {"run": run, "runq": runq}
MODELS = {"run": TESTDATA / "tiny_gqa.bin", "runq": TESTDATA / "tiny_gqa_q80.bin"}
PROMPTS = ["Once upon a time", "The dog", "A fox saw", "Lily"]


def model(module):
    return PACKAGES[module].Model(str(MODELS[module]), str(TOK))


def serial_texts(module):
    m = model(module)
    return ["".join(m.generate(p, steps=80, temperature=1.0, seed=i + 1)) for i, p in enumerate(PROMPTS)]


@pytest.mark.parametrize("module", ["run", "runq"])
def test_interleaved_generators_give_serial_results(module):
    expected = serial_texts(module)
    m = model(module)
    generators = [m.generate(p, steps=80, temperature=1.0, seed=i + 1) for i, p in enumerate(PROMPTS)]
    texts = ["" for _ in PROMPTS]
    live = list(range(len(PROMPTS)))
    while live:  # one piece from each in turn
        for i in list(live):
            piece = next(generators[i], None)
            if piece is None:
                live.remove(i)
            else:
                texts[i] += piece
    assert texts == expected
    assert len(set(texts)) == len(texts)  # four different stories, so a mix-up would show


@pytest.mark.parametrize("module", ["run", "runq"])
def test_generate_from_threads_gives_serial_results(module):
    expected = serial_texts(module)
    m = model(module)
    texts = [None] * len(PROMPTS)

    def work(i):
        texts[i] = "".join(m.generate(PROMPTS[i], steps=80, temperature=1.0, seed=i + 1))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(PROMPTS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert texts == expected


@pytest.mark.parametrize("module", ["run", "runq"])
def test_sequences_are_independent_and_match_a_fresh_model(module):
    m = model(module)
    tokens = [m.encode(p) for p in PROMPTS]
    expected = []
    for ids in tokens:  # each alone, on a freshly loaded model
        fresh = PACKAGES[module].Transformer(str(MODELS[module]))
        expected.append([fresh.forward(t, pos) for pos, t in enumerate(ids)])
    sequences = [m.sequence() for _ in PROMPTS]
    got = [[] for _ in PROMPTS]
    for step in range(max(map(len, tokens))):  # position by position, across the sequences
        for i, ids in enumerate(tokens):
            if step < len(ids):
                got[i].append(sequences[i].forward(ids[step]))
    for e, g, s, ids in zip(expected, got, sequences, tokens):
        np.testing.assert_array_equal(np.array(g), np.array(e))
        assert s.pos == len(ids)


def collide(forward, busy, attempts=200):
    """Runs forward in a thread, in a loop, and calls it here whenever busy() says that thread is
    inside: returns the errors raised here (forward's results are checked by the caller)."""
    stop = threading.Event()
    worker_errors = []

    def loop():
        try:
            while not stop.is_set():
                forward()
        except Exception as e:  # noqa: BLE001  reported below
            worker_errors.append(e)

    thread = threading.Thread(target=loop)
    thread.start()
    refused = []
    try:
        for _ in range(attempts):
            while not busy() and thread.is_alive():
                pass
            try:
                forward()
            except RuntimeError as e:
                refused.append(e)
            if len(refused) >= 3:
                break
    finally:
        stop.set()
        thread.join()
    assert not worker_errors, worker_errors
    return refused


BIG = dict(dim=256, hidden_dim=768, n_layers=4, n_heads=8, n_kv_heads=8, vocab_size=512, seq_len=4096)


@pytest.fixture(scope="module")
def big_model(tmp_path_factory):
    from llama2_cython import export
    path = tmp_path_factory.mktemp("big") / "big.bin"
    export.write_v0(path, BIG, export.random_model(BIG, seed=3, shared=True), True)
    return path


def test_one_transformer_from_two_threads_is_refused_not_corrupted(big_model):
    transformer = run.Transformer(str(big_model))
    expected = run.Transformer(str(big_model)).forward(7, 0)
    results = []

    def forward():
        results.append(transformer.forward(7, 0))  # the same token at the same place: same logits

    refused = collide(forward, transformer.state_lock.locked)
    assert refused and all("in use" in str(e) for e in refused)
    assert results and all(np.array_equal(r, expected) for r in results)


def test_one_sequence_from_two_threads_is_refused_not_corrupted(big_model):
    m = run.Model(str(big_model), str(TOK))
    seq = m.sequence()
    refused = collide(lambda: seq.forward(7), seq._lock.locked)
    assert refused and all("in use by another thread" in str(e) for e in refused)
    # every forward that ran went to its own position, in order: the cache is that of 7, 7, 7...
    check = m.sequence()
    for _ in range(seq.pos):
        check.forward(7)
    np.testing.assert_array_equal(seq.forward(7), check.forward(7))
    assert seq.pos == check.pos


@pytest.mark.parametrize("module", ["run", "runq"])
def test_two_generations_on_one_transformer_are_refused(module):
    mod = PACKAGES[module]
    transformer = mod.Transformer(str(MODELS[module]))
    tokenizer = mod.Tokenizer(str(TOK), 512)
    first = mod.generate(transformer, tokenizer, mod.Sampler(512, 1.0, 0.9, 1), "Once", 40)
    next(first)
    second = mod.generate(transformer, tokenizer, mod.Sampler(512, 1.0, 0.9, 2), "Once", 40)
    with pytest.raises(RuntimeError, match="in use"):
        next(second)
    with pytest.raises(RuntimeError, match="in use"):
        transformer.forward(1, 0)
    list(first)  # when the first generation ends, the state is free again
    assert transformer.forward(1, 0).shape == (512,)
    other = mod.generate(transformer.with_new_state(), tokenizer, mod.Sampler(512, 1.0, 0.9, 2), "Once", 40)
    assert next(other)


@pytest.mark.parametrize("module", ["run", "runq"])
def test_a_sequence_frees_its_state_with_it(module):
    import gc
    import os
    m = model(module)

    def rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def cycle(n):
        for _ in range(n):
            seq = m.sequence()
            seq.forward(1)
            "".join(m.generate("Once", steps=20, seed=1))
        gc.collect()

    cycle(5)
    before = rss()
    cycle(100)  # each has a KV cache of 3 x 128 x 32 x 2 floats and more
    assert rss() - before < 2 << 20
    weights = m.transformer.weights["rms_att_weight"]
    del m
    gc.collect()
    assert weights.sum() == weights.sum()  # the shared mapping outlives the model while viewed


@pytest.mark.parametrize("module", ["run", "runq"])
def test_sequence_feed_is_forward_token_by_token(module):
    m = model(module)
    ids = m.encode("Once upon a time, a little fox saw a big red ball in the park")
    one_by_one = m.sequence()
    expected = [one_by_one.forward(t) for t in ids][-1]
    together = m.sequence()
    got = together.feed(ids[:5])
    got = together.feed(ids[5:])  # a second prompt after the first: positions continue
    assert together.pos == one_by_one.pos == len(ids)
    # both go through forward_batch, whose products do not depend on the batch: the same bits
    np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(together.forward(5), one_by_one.forward(5))
    with pytest.raises(ValueError, match="overflow"):
        together.feed([5] * m.config["seq_len"])


@pytest.mark.parametrize("build", BUILDS)
@pytest.mark.parametrize("module", ["run", "runq"])
def test_generate_batch_gives_each_sequence_its_text_alone(module, build):
    # 36 sequences: two passes of forward_batch (32 + 4) until the short ones end
    n = 36
    prompts = [["Once upon a time", "The dog", "", "A fox saw a big red ball"][i % 4] for i in range(n)]
    steps = [20 + 7 * i for i in range(n)]
    temperatures = [[1.0, 0.0, 0.8, 1.5][i % 4] for i in range(n)]
    seeds = [i + 1 for i in range(n)]
    alone, together = in_build(build, "batch_vs_alone", prog=module, model=str(MODELS[module]),
                               tokenizer=str(TOK), prompts=prompts, steps=steps,
                               temperatures=temperatures, seeds=seeds)
    assert all(alone) and len(set(alone)) > n // 2
    # on both builds: alone or batched, a token's logits are the same bits (forward_batch)
    assert alone == together, [(a, t) for a, t in zip(alone, together) if a != t]


def test_stop_strings_across_pieces():
    from llama2_cython.api import _Text
    text = _Text([" the end", "!"])
    out = "".join(text.add(p) for p in [b"It was the", b" e", b"n", b"d of it"]) + text.end()
    assert out == "It was" and text.stopped
    text = _Text(" the end")
    out = "".join(text.add(p) for p in [b"the", b" en", b"emy"]) + text.end()
    assert out == "the enemy" and not text.stopped
    text = _Text(None)
    assert text.add(b"\xe2\x82") == "" and text.add(b"\xac") == "\u20ac"  # a character over two pieces
    m = model("run")
    full = "".join(m.generate("Once upon a time", steps=60, seed=1))
    cut = full[len("Once upon a time") + 5:][:3]
    stopped = "".join(m.generate("Once upon a time", steps=60, seed=1, stop=cut))
    assert full.startswith(stopped) and cut not in stopped and len(stopped) < len(full)

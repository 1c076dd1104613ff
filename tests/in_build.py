"""`python tests/in_build.py ROOT FUNCTION`: calls FUNCTION of this file with the JSON keyword
arguments read from stdin, with ROOT first on sys.path so that `run` and `runq` are the packages of
the build there (tests.helpers.in_build); writes the JSON result on stdout."""
import importlib
import json
import sys


def logits(prog, model, tokens):
    """forward() of prog at positions 0, 1, ... fed tokens: one list of floats per position
    (float32 values, which JSON carries exactly)."""
    transformer = importlib.import_module(prog).Transformer(model)
    return [transformer.forward(token, pos).tolist() for pos, token in enumerate(tokens)]


def logits_npy(prog, model, tokens, out):
    """logits(), saved as one float32 array (positions, vocab) in the .npy file out: at 128k tokens
    a vocabulary's logits are too many floats to pass as JSON quickly."""
    import numpy as np
    transformer = importlib.import_module(prog).Transformer(model)
    np.save(out, np.stack([transformer.forward(token, pos) for pos, token in enumerate(tokens)]))
    return out


def encode(prog, tokenizer, vocab_size, cases):
    """prog's encode() of each case's text, with its bos and eos flags."""
    tok = importlib.import_module(prog).Tokenizer(tokenizer, vocab_size)
    return [tok.encode(case["text"], bool(case["bos"]), bool(case["eos"])) for case in cases]


def prefill_vs_forward(prog, model, tokens, sizes):
    """For each n in sizes: [n, whether forward_prompt(tokens[:n]) gives the logits after the n-th
    token that the engine's forward() one token at a time gives (bit for bit), whether it gives C's
    forward()'s (forward(reference=True)) bit for bit, its largest difference from C's relative
    to the logit scale, then the same three for the forward() of tokens[n] that follows (it reads
    the KV cache the prefill wrote)]."""
    import numpy as np
    transformer = importlib.import_module(prog).Transformer(model)
    serial = [transformer.forward(token, pos) for pos, token in enumerate(tokens)]
    reference = transformer.with_new_state()
    c_serial = [reference.forward(token, pos, reference=True) for pos, token in enumerate(tokens)]
    scale = float(np.abs(np.array(c_serial)).max())

    def compare(got, i):
        return [bool(np.array_equal(got, serial[i])), bool(np.array_equal(got, c_serial[i])),
                float(np.abs(got - c_serial[i]).max()) / scale]
    out = []
    for n in sizes:
        sequence = transformer.with_new_state()
        row = [n] + compare(sequence.forward_prompt(tokens[:n]), n - 1)
        if n < len(tokens):
            row += compare(sequence.forward(tokens[n], n), n)
        out.append(row)
    return out


def batch_vs_alone(prog, model, tokenizer, prompts, steps, temperatures, seeds):
    """Each prompt's text from Model.generate alone, and from one Model.generate_batch of all."""
    m = importlib.import_module(prog).Model(model, tokenizer)
    alone = ["".join(m.generate(p, steps=n, temperature=t, seed=s))
             for p, n, t, s in zip(prompts, steps, temperatures, seeds)]
    together = [""] * len(prompts)
    for i, text in m.generate_batch(prompts, steps=steps, temperature=temperatures, seed=seeds):
        together[i] += text
    return [alone, together]


def packed_twin(pairs, tokens):
    """For each [v2 file, its packed twin (layout 1)]: whether runq gives the same logits from
    both, bit for bit, through forward() (the engine), forward_prompt(), forward(reference=True)
    (C's forward(), on rows unpacked on demand where the engine multiplies the packed file) and
    from the packed file with pack=False (rows unpacked at load); whether the weights views agree;
    and whether the engine multiplies each file packed."""
    import numpy as np
    runq = importlib.import_module("runq")
    out = []
    for v2, packed in pairs:
        a, b = runq.Transformer(v2), runq.Transformer(packed)
        rows = runq.Transformer(packed, pack=False)
        same = {"forward": True, "reference": True, "prompt": True, "rows": True}
        ra, rb = a.with_new_state(), b.with_new_state()
        for pos, token in enumerate(tokens):
            la = a.forward(token, pos)
            same["forward"] &= bool(np.array_equal(la, b.forward(token, pos)))
            same["rows"] &= bool(np.array_equal(la, rows.forward(token, pos)))
            same["reference"] &= bool(np.array_equal(ra.forward(token, pos, reference=True),
                                                     rb.forward(token, pos, reference=True)))
        same["prompt"] = bool(np.array_equal(a.with_new_state().forward_prompt(tokens),
                                             b.with_new_state().forward_prompt(tokens)))
        wa, wb = a.weights, b.weights
        same["weights"] = sorted(wa) == sorted(wb) and all(
            all(np.array_equal(x, y) for x, y in zip(wa[k], wb[k])) if isinstance(wa[k], tuple)
            else np.array_equal(wa[k], wb[k]) for k in wa)
        same["packed"] = [a.packed, b.packed, rows.packed]
        out.append(same)
    return out


def top_p(prog, n, seed):
    """Top-p draws from softmaxes of n random logits at several spreads (flat to peaked, and
    rounded: ties), topps and coins: [sample_topp_fast's tokens, run.c's sample_topp's]."""
    import numpy as np
    engine = importlib.import_module(f"{prog}._{prog}")  # the compiled module (sample_topp_of)
    rng = np.random.default_rng(seed)
    fast, reference = [], []
    for logits in (0.5 * rng.standard_normal(n), 2 * rng.standard_normal(n), 8 * rng.standard_normal(n),
                   np.round(2 * rng.standard_normal(n))):
        e = np.exp(logits - logits.max())
        p = (e / e.sum()).astype(np.float32)
        for topp in (1e-4, 0.5, 0.9, 0.99):
            for coin in np.float32([0.0, 0.5, 0.999, rng.random()]):
                fast.append(engine.sample_topp_of(p, topp, coin))
                reference.append(engine.sample_topp_of(p, topp, coin, reference=True))
    return [fast, reference]


def argmax(prog, cases):
    """Greedy sampling's token for each case's float32 values (JSON has no NaN or infinity:
    their names, as strings): [sample_argmax_fast's tokens, run.c's sample_argmax's]."""
    import numpy as np
    engine = importlib.import_module(f"{prog}._{prog}")
    arrays = [np.array([float(v) for v in case], np.float32) for case in cases]
    return [[engine.sample_argmax_of(a) for a in arrays],
            [engine.sample_argmax_of(a, reference=True) for a in arrays]]


def int8_kernel():
    """Which of q8matmul.h's paths runq's build compiled."""
    return importlib.import_module("runq").INT8_KERNEL


def int8_batch_kernel():
    """The kernel runq's build chooses at run time for products of 2 or more tokens (this
    process's LLAMA2_INT8_KERNEL applies)."""
    return importlib.import_module("runq").int8_batch_kernel()


if __name__ == "__main__":
    root, function = sys.argv[1:]
    sys.path.insert(0, root)
    json.dump(globals()[function](**json.load(sys.stdin)), sys.stdout)

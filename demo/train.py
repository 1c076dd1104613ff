#!/usr/bin/env python3
"""Train the demo model from scratch on CPU and export it for run and runq.

    python -m demo.train --out demo/ --seed 0      (from the repository's root)

does everything, deterministically for a given seed: generates the story corpus (corpus.py),
trains a sentencepiece BPE tokenizer on it (stories_tok.model, exported to stories_tok.bin with
tokenizer.py), trains a small Llama 2 in PyTorch, and writes stories_demo.bin (v0, fp32, for run)
and stories_demo_q80.bin (v2, Q8_0, for runq) with export.py.

PyTorch is a development-only dependency: only this script imports it.
"""
import argparse
import math
import os
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from demo import corpus
from llama2_cython import export, tokenizer
from llama2_cython.cli import run_command
from llama2_cython.files import atomic_write


# ---------------------------------------------------------------------------- the model

class RMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rope_tables(head_size, seq_len):
    """cos and sin (seq_len, head_size/2): run.c rotates pairs (i, i+1) of each head by
    pos * 10000^(-(i % head_size) / head_size), i even."""
    inv = 1.0 / (10000.0 ** (torch.arange(0, head_size, 2).float() / head_size))
    angles = torch.outer(torch.arange(seq_len).float(), inv)
    return torch.cos(angles), torch.sin(angles)


def apply_rope(x, cos, sin):
    """x: (batch, seq, heads, head_size); rotates interleaved pairs as run.c does."""
    x0, x1 = x[..., 0::2], x[..., 1::2]
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    return torch.stack((x0 * c - x1 * s, x0 * s + x1 * c), dim=-1).flatten(-2)


class Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.n_heads, self.n_kv_heads = cfg["n_heads"], cfg["n_kv_heads"]
        self.head_size = cfg["dim"] // cfg["n_heads"]
        dim, kv_dim = cfg["dim"], self.n_kv_heads * self.head_size
        self.wq = nn.Linear(dim, dim, bias=False)
        self.wk = nn.Linear(dim, kv_dim, bias=False)
        self.wv = nn.Linear(dim, kv_dim, bias=False)
        self.wo = nn.Linear(dim, dim, bias=False)

    def forward(self, x, cos, sin):
        b, t, _ = x.shape
        q = self.wq(x).view(b, t, self.n_heads, self.head_size)
        k = self.wk(x).view(b, t, self.n_kv_heads, self.head_size)
        v = self.wv(x).view(b, t, self.n_kv_heads, self.head_size)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        rep = self.n_heads // self.n_kv_heads  # GQA: query head h reads kv head h // rep
        k = k.repeat_interleave(rep, dim=2)
        v = v.repeat_interleave(rep, dim=2)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                             v.transpose(1, 2), is_causal=True)
        return self.wo(out.transpose(1, 2).reshape(b, t, -1))


class FeedForward(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.w1 = nn.Linear(cfg["dim"], cfg["hidden_dim"], bias=False)
        self.w2 = nn.Linear(cfg["hidden_dim"], cfg["dim"], bias=False)
        self.w3 = nn.Linear(cfg["dim"], cfg["hidden_dim"], bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.attention_norm = RMSNorm(cfg["dim"])
        self.attention = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg["dim"])
        self.feed_forward = FeedForward(cfg)

    def forward(self, x, cos, sin):
        x = x + self.attention(self.attention_norm(x), cos, sin)
        return x + self.feed_forward(self.ffn_norm(x))


class Llama(nn.Module):
    """Llama 2 as run.c computes it; parameter names as llama2.c's model.py (export.py reads
    them with weights_from_state_dict). The classifier is tied to the embedding table."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg["vocab_size"], cfg["dim"])
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg["n_layers"]))
        self.norm = RMSNorm(cfg["dim"])
        cos, sin = rope_tables(cfg["dim"] // cfg["n_heads"], cfg["seq_len"])
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)
        self.apply(self._init)
        for name, p in self.named_parameters():  # GPT-2 style scaled init of residual outputs
            if name.endswith(("wo.weight", "w2.weight")):
                nn.init.normal_(p, 0.0, 0.02 / math.sqrt(2 * cfg["n_layers"]))

    @staticmethod
    def _init(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, 0.0, 0.02)

    def forward(self, tokens, targets=None):
        t = tokens.shape[1]
        x = self.tok_embeddings(tokens)
        for layer in self.layers:
            x = layer(x, self.cos[:t], self.sin[:t])
        logits = F.linear(self.norm(x), self.tok_embeddings.weight)
        if targets is None:
            return logits
        return F.cross_entropy(logits.view(-1, logits.shape[-1]), targets.reshape(-1))


# ---------------------------------------------------------------------------- data

def train_tokenizer(lines, prefix, vocab_size):
    """A sentencepiece BPE model at prefix + '.model', trained deterministically on lines (fed
    from memory, so that no file path is recorded in the model and it is byte-reproducible).
    Like every file train.py writes, it replaces the old one only once complete."""
    import sentencepiece as spm
    path = prefix + ".model"
    with atomic_write(path) as fh:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines), model_writer=fh, model_type="bpe",
            vocab_size=vocab_size, character_coverage=1.0, byte_fallback=True, split_digits=True,
            allow_whitespace_only_pieces=True, normalization_rule_name="identity",
            add_dummy_prefix=True, max_sentence_length=4096, input_sentence_size=0,
            shuffle_input_sentence=False, num_threads=1, unk_id=0, bos_id=1, eos_id=2,
            pad_id=-1, minloglevel=2)
    return path


def encode(model_path, lines):
    """All lines as one stream of token ids, each story preceded by BOS (1), as run.c starts."""
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_file=model_path)
    ids = []
    for pieces in sp.encode(lines):
        ids.append(sp.bos_id())
        ids.extend(pieces)
    return np.array(ids, dtype=np.int64)


def batch(data, rng, batch_size, seq_len):
    starts = rng.integers(0, len(data) - seq_len - 1, batch_size)
    chunk = np.stack([data[s:s + seq_len + 1] for s in starts])
    x = torch.from_numpy(chunk[:, :-1].copy())
    y = torch.from_numpy(chunk[:, 1:].copy())
    return x, y


# ---------------------------------------------------------------------------- main

def main(argv=None):
    p = argparse.ArgumentParser(description="Train and export the demo story model.")
    p.add_argument("--out", default="demo", help="output folder (default: demo)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stories", type=int, default=20000)
    p.add_argument("--vocab-size", type=int, default=512)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--hidden-dim", type=int, default=192)
    p.add_argument("--n-layers", type=int, default=5)
    p.add_argument("--n-heads", type=int, default=8)
    p.add_argument("--n-kv-heads", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1: results depend on it; 2 threads is faster on "
                        "an idle 2-core machine, far slower on a busy one)")
    args = p.parse_args(argv)

    t0 = time.time()
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)

    lines = corpus.stories(args.seed, args.stories)
    model_path = train_tokenizer(lines, os.path.join(args.out, "stories_tok"), args.vocab_size)
    tok_bin = tokenizer.export_tokenizer(model_path, os.path.join(args.out, "stories_tok.bin"))
    print(f"tokenizer: {model_path}, {tok_bin}", flush=True)
    n_val = max(1, len(lines) // 20)
    train_data, val_data = encode(model_path, lines[:-n_val]), encode(model_path, lines[-n_val:])
    print(f"corpus: {len(lines)} stories, {len(train_data)} train / {len(val_data)} val tokens",
          flush=True)

    cfg = dict(dim=args.dim, hidden_dim=args.hidden_dim, n_layers=args.n_layers,
               n_heads=args.n_heads, n_kv_heads=args.n_kv_heads, vocab_size=args.vocab_size,
               seq_len=args.seq_len)
    model = Llama(cfg)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"config: {cfg}, {n_params} parameters", flush=True)

    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95))
    rng = np.random.default_rng(args.seed)
    val_rng = np.random.default_rng(args.seed + 1)
    val_batches = [batch(val_data, val_rng, args.batch_size, args.seq_len) for _ in range(4)]

    def lr_at(step):
        if step < args.warmup:
            return args.lr * (step + 1) / args.warmup
        frac = (step - args.warmup) / max(1, args.steps - args.warmup)
        return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, frac))))

    @torch.no_grad()
    def val_loss():
        model.eval()
        loss = sum(model(x, y).item() for x, y in val_batches) / len(val_batches)
        model.train()
        return loss

    train_loss = float("nan")
    for step in range(args.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        x, y = batch(train_data, rng, args.batch_size, args.seq_len)
        loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        train_loss = loss.item() if step == 0 else 0.9 * train_loss + 0.1 * loss.item()
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            print(f"step {step + 1}/{args.steps}: train loss {train_loss:.4f}, "
                  f"val loss {val_loss():.4f}, lr {lr_at(step):.2e}, "
                  f"{time.time() - t0:.0f} s", flush=True)

    state = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    model_args = dict(dim=cfg["dim"], n_layers=cfg["n_layers"], n_heads=cfg["n_heads"],
                      n_kv_heads=cfg["n_kv_heads"], vocab_size=cfg["vocab_size"],
                      max_seq_len=cfg["seq_len"])
    config, weights, shared = export.weights_from_state_dict(state, model_args)
    v0 = os.path.join(args.out, "stories_demo.bin")
    v2 = os.path.join(args.out, "stories_demo_q80.bin")
    export.write_v0(v0, config, weights, shared)
    group = export.write_v2(v2, config, weights, shared)
    print(f"wrote {v0} (v0 fp32) and {v2} (v2 Q8_0, group size {group}); "
          f"{time.time() - t0:.0f} s in all", flush=True)
    return 0


if __name__ == "__main__":
    # Ctrl-C or SIGTERM part-way: one line, status 130 or 143, the files of the last run intact
    sys.exit(run_command("train.py", main))

"""A plain NumPy Llama 2 forward pass: the model written out step by step, for checking the
Cython one. Readable, not fast; float64 throughout so that it is the more accurate of the two."""
import numpy as np


def rmsnorm(x, weight):
    return weight * (x / np.sqrt(np.mean(x * x) + 1e-5))


def softmax(x):
    e = np.exp(x - x.max())
    return e / e.sum()


def rope(vec, pos, head_size):
    """Rotate each consecutive pair (vec[i], vec[i+1]) by pos * 10000^(-(i % head_size) / head_size)."""
    i = np.arange(0, vec.size, 2)
    angle = pos * (1.0 / 10000.0 ** ((i % head_size) / head_size))
    cos, sin = np.cos(angle), np.sin(angle)
    even, odd = vec[0::2], vec[1::2]
    out = np.empty_like(vec)
    out[0::2] = even * cos - odd * sin
    out[1::2] = even * sin + odd * cos
    return out


class ReferenceTransformer:
    """Same interface as run.Transformer: forward(token, pos) -> logits, with its own KV cache."""

    def __init__(self, config, weights):
        self.c = config
        self.w = {name: np.asarray(t, dtype=np.float64) for name, t in weights.items()}
        self.head_size = config["dim"] // config["n_heads"]
        kv_dim = config["n_kv_heads"] * self.head_size
        shape = (config["n_layers"], config["seq_len"], kv_dim)
        self.key_cache = np.zeros(shape)
        self.value_cache = np.zeros(shape)

    def forward(self, token, pos):
        c, w, hs = self.c, self.w, self.head_size
        kv_mul = c["n_heads"] // c["n_kv_heads"]
        x = w["token_embedding_table"][token].copy()
        for l in range(c["n_layers"]):
            # attention: grouped-query heads over the cached keys and values of positions 0..pos
            xb = rmsnorm(x, w["rms_att_weight"][l])
            q = rope(w["wq"][l] @ xb, pos, hs)
            self.key_cache[l, pos] = rope(w["wk"][l] @ xb, pos, hs)
            self.value_cache[l, pos] = w["wv"][l] @ xb
            heads = []
            for h in range(c["n_heads"]):
                kv = slice((h // kv_mul) * hs, (h // kv_mul + 1) * hs)
                keys = self.key_cache[l, :pos + 1, kv]
                values = self.value_cache[l, :pos + 1, kv]
                att = softmax(keys @ q[h * hs:(h + 1) * hs] / np.sqrt(hs))
                heads.append(att @ values)
            x = x + w["wo"][l] @ np.concatenate(heads)
            # feed-forward: SwiGLU
            xb = rmsnorm(x, w["rms_ffn_weight"][l])
            gate = w["w1"][l] @ xb
            x = x + w["w2"][l] @ (gate / (1.0 + np.exp(-gate)) * (w["w3"][l] @ xb))
        x = rmsnorm(x, w["rms_final_weight"])
        return w["wcls"] @ x

"""The memory path, frame by frame, against a straightforward re-implementation of method.md.

The reference below shares no code with ``models/``: it reads the weights, then runs the
Q-Former with explicit loops (one instruction at a time, one head at a time), keeps banks
as Python lists, and compresses them position by position, in float64.
"""

from __future__ import annotations

import math

import pytest
import torch

from models import MALMM

torch.set_default_dtype(torch.float32)


# ---- reference implementation (method.md, written plainly) ---------------------------


def _ln(x, w, b, eps):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * w + b


def _gelu(x):
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def _attention(q_in, kv_in, W, prefix, heads, key_valid=None):
    """q_in [Lq, H], kv_in [S, Hkv]; key_valid [S] bool or None. Loops over heads."""
    q = q_in @ W[prefix + "query.weight"].T + W[prefix + "query.bias"]
    k = kv_in @ W[prefix + "key.weight"].T + W[prefix + "key.bias"]
    v = kv_in @ W[prefix + "value.weight"].T + W[prefix + "value.bias"]
    d = q.shape[1] // heads
    outs = []
    for h in range(heads):
        sl = slice(h * d, (h + 1) * d)
        scores = q[:, sl] @ k[:, sl].T / math.sqrt(d)
        if key_valid is not None:
            scores = scores.masked_fill(~key_valid[None, :], float("-inf"))
        outs.append(torch.softmax(scores, dim=-1) @ v[:, sl])
    return torch.cat(outs, dim=1)


def _compress(bank, counts):
    """One MBC step on lists of T slot tensors ([N, C] and [N]); loops over positions."""
    T, N = len(bank), bank[0].shape[0]
    new_bank = [torch.empty_like(bank[0]) for _ in range(T - 1)]
    new_counts = [torch.empty_like(counts[0]) for _ in range(T - 1)]
    for i in range(N):
        seq = [bank[s][i] for s in range(T)]
        cnt = [counts[s][i] for s in range(T)]
        sims = [float(seq[j] @ seq[j + 1] / (seq[j].norm() * seq[j + 1].norm())) for j in range(T - 1)]
        j = sims.index(max(sims))
        merged = (cnt[j] * seq[j] + cnt[j + 1] * seq[j + 1]) / (cnt[j] + cnt[j + 1])
        seq = seq[:j] + [merged] + seq[j + 2 :]
        cnt = cnt[:j] + [cnt[j] + cnt[j + 1]] + cnt[j + 2 :]
        for s in range(T - 1):
            new_bank[s][i], new_counts[s][i] = seq[s], cnt[s]
    return new_bank, new_counts


class ReferenceMALMM:
    """One instruction's Q-Former over a video, per method.md, with list banks."""

    def __init__(self, model: MALMM, input_ids, valid, M):
        cfg = model.qformer.config
        self.W = {k: v.double() for k, v in model.qformer.state_dict().items()}
        self.heads, self.eps, self.M = cfg.num_attention_heads, cfg.layer_norm_eps, M
        self.layers, self.freq = cfg.num_hidden_layers, cfg.cross_attention_frequency
        self.Q = model.num_query_tokens
        self.pe = model.temporal_embedding.weight.detach().double()
        W = self.W
        text = W["embeddings.word_embeddings.weight"][input_ids] + W["embeddings.position_embeddings.weight"][
            : len(input_ids)
        ]
        emb = torch.cat([model.query_tokens.detach()[0].double(), text])
        self.embeddings = _ln(emb, W["embeddings.layernorm.weight"], W["embeddings.layernorm.bias"], self.eps)
        self.valid = torch.cat([torch.ones(self.Q, dtype=torch.bool), valid])
        self.visual, self.visual_counts = [], []
        self.query = [[] for _ in range(self.layers)]
        self.query_counts = [[] for _ in range(self.layers)]
        self.t = 0

    def _add(self, bank, counts, x):
        if self.M == 0:
            return bank, counts
        bank, counts = bank + [x], counts + [torch.ones(x.shape[0], dtype=torch.float64)]
        if len(bank) > self.M:
            bank, counts = _compress(bank, counts)
        return bank, counts

    def step(self, features):
        """features [P, C] of one frame -> query output [Q, H]."""
        W, Q = self.W, self.Q
        f = features.double() + self.pe[min(self.t, 119)]
        h = self.embeddings
        for l in range(self.layers):
            p = f"encoder.layer.{l}."
            kv = torch.cat(self.query[l] + [h])  # [(T+1) * N, H]
            valid = self.valid.repeat(len(self.query[l]) + 1)
            a = _attention(h, kv, W, p + "attention.attention.", self.heads, valid)
            a = _ln(a @ W[p + "attention.output.dense.weight"].T + W[p + "attention.output.dense.bias"] + h,
                    W[p + "attention.output.LayerNorm.weight"], W[p + "attention.output.LayerNorm.bias"], self.eps)
            self.query[l], self.query_counts[l] = self._add(self.query[l], self.query_counts[l], h)
            if l % self.freq == 0:
                q = a[:Q]
                visual = torch.cat(self.visual + [f])  # all frames in the bank plus this one
                c = _attention(q, visual, W, p + "crossattention.attention.", self.heads)
                c = _ln(c @ W[p + "crossattention.output.dense.weight"].T + W[p + "crossattention.output.dense.bias"]
                        + q, W[p + "crossattention.output.LayerNorm.weight"],
                        W[p + "crossattention.output.LayerNorm.bias"], self.eps)
                a = torch.cat([c, a[Q:]])
            parts = []
            for part, (inter, out) in ((a[:Q], ("intermediate_query", "output_query")), (a[Q:], ("intermediate", "output"))):
                x = _gelu(part @ W[p + inter + ".dense.weight"].T + W[p + inter + ".dense.bias"])
                x = x @ W[p + out + ".dense.weight"].T + W[p + out + ".dense.bias"]
                parts.append(_ln(x + part, W[p + out + ".LayerNorm.weight"], W[p + out + ".LayerNorm.bias"], self.eps))
            h = torch.cat(parts)
        self.visual, self.visual_counts = self._add(self.visual, self.visual_counts, f)
        self.t += 1
        return h[:Q]


# ---- tests ------------------------------------------------------------------------------

INSTRUCTIONS = ["what does the video describe?", "who wins?"]  # different lengths: one is padded


@pytest.fixture(scope="module")
def model_with_pe(tiny_dir):
    """A tiny model whose temporal position embedding is non-zero, as after finetuning."""
    model = MALMM.from_pretrained(str(tiny_dir), memory_bank_length=4, dtype=torch.float32, device="cpu")
    with torch.no_grad():
        model.temporal_embedding.weight.copy_(0.3 * torch.randn(model.temporal_embedding.weight.shape,
                                                                generator=torch.Generator().manual_seed(7)))
    return model


def _video_features(n, seed=0):
    """Vision features [n, 257, 32] that drift over time at varying speed (a random walk)."""
    gen = torch.Generator().manual_seed(seed)
    f = [torch.randn(257, 32, generator=gen)]
    for t in range(1, n):
        f.append(f[-1] + (0.2 + t % 3) * torch.randn(257, 32, generator=gen))
    return torch.stack(f)


@pytest.mark.parametrize("cache_projections", [True, False])
@pytest.mark.parametrize("M, frames", [(0, 3), (1, 4), (2, 7), (4, 7), (4, 2)])
def test_memory_path_matches_method_frame_by_frame(model_with_pe, M, frames, cache_projections):
    model = model_with_pe
    stream = model.new_stream(INSTRUCTIONS, memory_bank_length=M, cache_projections=cache_projections)
    assert stream.key_mask is not None and not stream.key_mask.all(), "the test needs a padded instruction"
    refs = [
        ReferenceMALMM(model, stream.input_ids[b].cpu(), stream.key_mask[b, model.num_query_tokens :].cpu(), M)
        for b in range(len(INSTRUCTIONS))
    ]
    features = _video_features(frames, seed=M * 10 + frames)
    for t in range(frames):
        stream.add_features(features[t : t + 1])
        expected = torch.stack([ref.step(features[t]) for ref in refs]).float()
        torch.testing.assert_close(stream.query_output(), expected, rtol=1e-4, atol=1e-4,
                                   msg=lambda m: f"frame {t}: {m}")
        # Bank state matches too: length and the number of frames each slot stands for.
        assert stream.memory.length == len(refs[0].visual)
        if M:
            ref_counts = torch.stack(refs[0].visual_counts).mean(dim=1).tolist()
            assert list(stream.memory.slot_frames) == pytest.approx(ref_counts)


def test_the_memory_reaches_back_past_the_bank_length(model_with_pe):
    """With M=2 the first frame still shapes the output at frame 6 (compressed, not dropped)."""
    model = model_with_pe
    features = _video_features(6, seed=3)
    altered = features.clone()
    altered[0] += 5.0
    outs = []
    for feats in (features, altered):
        stream = model.new_stream(INSTRUCTIONS, memory_bank_length=2)
        stream.add_features(feats)
        outs.append(stream.query_output())
    assert (outs[0] - outs[1]).abs().max() > 1e-4

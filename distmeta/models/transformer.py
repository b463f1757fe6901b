"""An encoder-decoder Transformer (Vaswani et al. 2017) as pure functions over a parameter
dict, for translation tasks: pre-norm layers, sinusoidal positions, embeddings shared by
source, target and output projection (optionally separate source embeddings).

Attention is written out (matmul, mask, softmax) rather than fused, so that it works under
``vmap`` over tasks and with second derivatives, like every other model here.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor

from distmeta.data.translation import BOS, EOS, PAD
from distmeta.models.base import TaskModel, vmapped
from distmeta.types import Batch, Metrics, Params


@dataclass(frozen=True)
class TransformerSize:
    vocab: int
    dim: int = 256
    heads: int = 4
    ffn: int = 1024
    encoder_layers: int = 3
    decoder_layers: int = 3
    shared_embeddings: bool = True  # one table for source, target and output projection


def init_transformer(generator: torch.Generator, size: TransformerSize) -> Params:
    """Xavier-uniform matrices, N(0, dim^-1/2) embeddings, zero biases, unit layer-norm gains."""
    d, params = size.dim, {}

    def matrix(name: str, rows: int, cols: int) -> None:
        bound = math.sqrt(6.0 / (rows + cols))
        params[name] = (torch.rand(rows, cols, generator=generator) * 2 - 1) * bound

    def norm(name: str) -> None:
        params[f"{name}.weight"], params[f"{name}.bias"] = torch.ones(d), torch.zeros(d)

    def attention(prefix: str) -> None:
        for part in ("q", "k", "v", "o"):
            matrix(f"{prefix}.{part}", d, d)

    def feed_forward(prefix: str) -> None:
        matrix(f"{prefix}.in", size.ffn, d)
        params[f"{prefix}.in_bias"] = torch.zeros(size.ffn)
        matrix(f"{prefix}.out", d, size.ffn)
        params[f"{prefix}.out_bias"] = torch.zeros(d)

    params["embed.target"] = torch.randn(size.vocab, d, generator=generator) * d**-0.5
    if not size.shared_embeddings:
        params["embed.source"] = torch.randn(size.vocab, d, generator=generator) * d**-0.5
    for i in range(size.encoder_layers):
        norm(f"encoder.{i}.norm1"), attention(f"encoder.{i}.self"), norm(f"encoder.{i}.norm2")
        feed_forward(f"encoder.{i}.ffn")
    norm("encoder.norm")
    for i in range(size.decoder_layers):
        norm(f"decoder.{i}.norm1"), attention(f"decoder.{i}.self"), norm(f"decoder.{i}.norm2")
        attention(f"decoder.{i}.cross"), norm(f"decoder.{i}.norm3"), feed_forward(f"decoder.{i}.ffn")
    norm("decoder.norm")
    return params


def _positions(length: int, dim: int, device: torch.device) -> Tensor:
    position = torch.arange(length, device=device, dtype=torch.float32)[:, None]
    frequency = torch.exp(torch.arange(0, dim, 2, device=device, dtype=torch.float32) * (-math.log(10000.0) / dim))
    table = torch.zeros(length, dim, device=device)
    table[:, 0::2], table[:, 1::2] = torch.sin(position * frequency), torch.cos(position * frequency)
    return table


def _norm(params: Params, name: str, x: Tensor) -> Tensor:
    return F.layer_norm(x, x.shape[-1:], params[f"{name}.weight"], params[f"{name}.bias"])


def _attend(params: Params, prefix: str, heads: int, x: Tensor, memory: Tensor, keep: Tensor) -> Tensor:
    """Multi-head attention of ``x`` (B, L, d) over ``memory`` (B, M, d); ``keep`` (B, L or 1, M)
    is False where a query must not look."""
    b, length, d = x.shape
    split = lambda t: t.reshape(b, -1, heads, d // heads).transpose(1, 2)  # noqa: E731
    q, k, v = (split(t @ params[f"{prefix}.{p}"].t()) for t, p in ((x, "q"), (memory, "k"), (memory, "v")))
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(d // heads)
    # The lowest finite value, not -inf: a padding row masks every key, and softmax over all
    # -inf is NaN, which would reach the gradients even though its loss weight is 0.
    weights = torch.softmax(scores.masked_fill(~keep[:, None], torch.finfo(scores.dtype).min), dim=-1)
    return (weights @ v).transpose(1, 2).reshape(b, length, d) @ params[f"{prefix}.o"].t()


def _feed_forward(params: Params, prefix: str, x: Tensor) -> Tensor:
    hidden = torch.relu(x @ params[f"{prefix}.in"].t() + params[f"{prefix}.in_bias"])
    return hidden @ params[f"{prefix}.out"].t() + params[f"{prefix}.out_bias"]


def _embed(params: Params, table: str, ids: Tensor) -> Tensor:
    weights = params[table] if table in params else params["embed.target"]
    return weights[ids] * math.sqrt(weights.shape[1]) + _positions(ids.shape[-1], weights.shape[1], ids.device)


def encode(params: Params, size: TransformerSize, src: Tensor) -> tuple[Tensor, Tensor]:
    """Encoder states (B, S, d) of source ids (B, S) and the mask of real source tokens (B, 1, S)."""
    keep = (src != PAD)[:, None, :]
    x = _embed(params, "embed.source", src)
    for i in range(size.encoder_layers):
        h = _norm(params, f"encoder.{i}.norm1", x)
        x = x + _attend(params, f"encoder.{i}.self", size.heads, h, h, keep)
        x = x + _feed_forward(params, f"encoder.{i}.ffn", _norm(params, f"encoder.{i}.norm2", x))
    return _norm(params, "encoder.norm", x), keep


def decode_logits(params: Params, size: TransformerSize, memory: Tensor, source_keep: Tensor, tgt_in: Tensor) -> Tensor:
    """Next-token logits (B, L, vocab) for decoder inputs (B, L), causally masked."""
    length = tgt_in.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=tgt_in.device).tril()[None]
    x = _embed(params, "embed.target", tgt_in)
    for i in range(size.decoder_layers):
        h = _norm(params, f"decoder.{i}.norm1", x)
        x = x + _attend(params, f"decoder.{i}.self", size.heads, h, h, causal)
        x = x + _attend(params, f"decoder.{i}.cross", size.heads, _norm(params, f"decoder.{i}.norm2", x), memory,
                        source_keep)
        x = x + _feed_forward(params, f"decoder.{i}.ffn", _norm(params, f"decoder.{i}.norm3", x))
    return _norm(params, "decoder.norm", x) @ params["embed.target"].t()


def translation_loss(params: Params, batch: Batch, size: TransformerSize) -> tuple[Tensor, Metrics]:
    """Mean token cross-entropy of one task's pairs ``(src (B, S), tgt (B, L))`` under teacher
    forcing, pads ignored; metrics: token accuracy and the number of target tokens."""
    src, tgt = batch
    memory, keep = encode(params, size, src)
    logits = decode_logits(params, size, memory, keep, tgt[:, :-1])
    labels = tgt[:, 1:]
    real = labels != PAD
    token_loss = F.cross_entropy(logits.transpose(1, 2), labels, reduction="none")
    tokens = real.sum().clamp(min=1)
    loss = (token_loss * real).sum() / tokens
    correct = ((logits.argmax(-1) == labels) & real).sum()
    return loss, {"token_accuracy": (correct / tokens).detach(), "tokens": real.sum().float().detach()}


def make_transformer(size: TransformerSize) -> TaskModel:
    loss = partial(translation_loss, size=size)
    return TaskModel(name="transformer", init=partial(init_transformer, size=size), loss=loss,
                     batched_loss=vmapped(loss))


@torch.no_grad()
def greedy_decode(params: Params, size: TransformerSize, src: Tensor, max_len: int) -> Tensor:
    """Target ids (B, ≤ max_len + 1) starting with bos; each row stops after its eos (then pads)."""
    memory, keep = encode(params, size, src)
    out = torch.full((src.shape[0], 1), BOS, dtype=torch.long, device=src.device)
    done = torch.zeros(src.shape[0], dtype=torch.bool, device=src.device)
    for _ in range(max_len):
        following = decode_logits(params, size, memory, keep, out)[:, -1].argmax(-1)
        following = torch.where(done, torch.full_like(following, PAD), following)
        out = torch.cat([out, following[:, None]], dim=1)
        done |= following == EOS
        if done.all():
            break
    return out


@torch.no_grad()
def beam_search(params: Params, size: TransformerSize, src: Tensor, beam: int, max_len: int,
                alpha: float = 0.6) -> Tensor:
    """The best hypothesis per source row (B, S) under beam search, rows as ``greedy_decode``
    returns them. Finished hypotheses are ranked by log-probability over the GNMT length
    penalty ((5 + length) / 6) ** alpha (Wu et al. 2016), so short outputs are not favoured;
    the search stops once ``beam`` hypotheses have finished."""
    best = []
    for row in src:  # one sentence at a time: its hypotheses share one encoding
        memory, keep = encode(params, size, row[None])
        hypotheses = torch.full((1, 1), BOS, dtype=torch.long, device=src.device)
        scores = torch.zeros(1, device=src.device)
        finished: list[tuple[float, Tensor]] = []
        for _ in range(max_len):
            n = hypotheses.shape[0]
            logits = decode_logits(params, size, memory.expand(n, -1, -1), keep.expand(n, -1, -1), hypotheses)
            total = (scores[:, None] + torch.log_softmax(logits[:, -1], dim=-1)).reshape(-1)
            top = total.topk(min(beam, total.numel()))
            kept, kept_scores = [], []
            for value, index in zip(top.values, top.indices.tolist()):
                origin, token = divmod(index, logits.shape[-1])
                sequence = torch.cat([hypotheses[origin], hypotheses.new_tensor([token])])
                if token == EOS:
                    finished.append((float(value) / ((5 + len(sequence) - 1) / 6) ** alpha, sequence))
                else:
                    kept.append(sequence)
                    kept_scores.append(value)
            if len(finished) >= beam or not kept:
                break
            hypotheses, scores = torch.stack(kept), torch.stack(kept_scores)
        if not finished:  # nothing ended within max_len: rank the open hypotheses the same way
            finished = [(float(s) / ((5 + len(h) - 1) / 6) ** alpha, h) for h, s in zip(hypotheses, scores)]
        best.append(max(finished, key=lambda item: item[0])[1])
    out = torch.full((len(best), max(len(b) for b in best)), PAD, dtype=torch.long, device=src.device)
    for i, sequence in enumerate(best):
        out[i, :len(sequence)] = sequence
    return out

"""Tensor utilities the trainer needs around the loss: masked reductions, per-token logprobs
from logits, and per-token entropy.

Conventions: ``[B, T]`` tensors are (sequences, response positions); masks are 0/1 float or
bool of the same shape (a float mask with other weights also works: it is a weighted mean).
Everything that reduces over an empty mask returns 0 rather than NaN, because an all-padding
micro-batch (ragged data-parallel shards) is normal and must not poison the gradient.

The logits helpers work on row chunks: a ``[B, T, V]`` float32 ``log_softmax`` of a 150k
vocabulary is ~0.6 MB per position, so materialising it for a whole batch is what runs a
trainer out of memory. ``logsumexp`` + ``gather`` per chunk keeps the peak at one chunk.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

# Rows (positions) per chunk in token_logprobs / entropy_from_logits. 1024 rows x 150k vocab x
# 4 bytes ~ 0.6 GB of float32 temporaries at most.
DEFAULT_CHUNK_ROWS = 1024


def _as_weights(mask: Tensor, like: Tensor) -> Tensor:
    """The mask broadcast to ``like``'s shape as float (bool -> 0/1); never requires grad.

    Float32 at least: a bf16 sum of many ones is inexact (bf16 stops counting at 256).
    """
    dtype = torch.promote_types(like.dtype, torch.float32) if like.is_floating_point() else torch.float32
    return mask.detach().to(device=like.device, dtype=dtype).expand_as(like)


def masked_sum(x: Tensor, mask: Tensor, dim: Optional[int] = None) -> Tensor:
    """Sum of ``x * mask`` over ``dim`` (all elements when None)."""
    w = _as_weights(mask, x)
    if dim is None:
        return (x * w).sum()
    return (x * w).sum(dim=dim)


def masked_mean(x: Tensor, mask: Tensor, dim: Optional[int] = None) -> Tensor:
    """``sum(x * mask) / sum(mask)`` over ``dim``; 0 where the mask is empty (never NaN).

    The empty case divides a zero numerator by a denominator of 1 instead of using
    ``torch.where`` on ``0/0``, whose backward would produce NaN gradients.
    """
    w = _as_weights(mask, x)
    if dim is None:
        num, den = (x * w).sum(), w.sum()
    else:
        num, den = (x * w).sum(dim=dim), w.sum(dim=dim)
    den = torch.where(den > 0, den, torch.ones_like(den))
    return num / den


def masked_max(x: Tensor, mask: Tensor) -> Tensor:
    """Max of ``x`` where ``mask`` is set; 0 when the mask is empty. No gradient (metrics)."""
    sel = mask.detach().bool().expand_as(x)
    if not bool(sel.any()):
        return torch.zeros((), dtype=x.dtype, device=x.device)
    return x.detach()[sel].max()


def _row_chunks(n: int, chunk_rows: int):
    if chunk_rows <= 0:
        raise ValueError(f"nexrl.algorithms.ops: chunk_rows must be > 0, got {chunk_rows}")
    for start in range(0, n, chunk_rows):
        yield start, min(start + chunk_rows, n)


def token_logprobs(
    logits: Tensor,
    token_ids: Tensor,
    *,
    temperature: float = 1.0,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
) -> Tensor:
    """Log-probability of each ``token_ids[b, t]`` under ``softmax(logits[b, t] / temperature)``.

    Args:
        logits: ``[..., V]`` scores, already aligned so that position t predicts token_ids[t]
            (i.e. the caller has dropped the last position and the first token, as usual for
            causal LMs).
        token_ids: ``[...]`` integer ids, same leading shape as ``logits``.
        temperature: divide logits by this first. Use the engine's sampling temperature so the
            trainer's logprobs describe the distribution the engine actually sampled from.
        chunk_rows: positions processed at once (bounds the float32 temporaries).

    Returns:
        ``[...]`` float32 logprobs; differentiable w.r.t. ``logits``.

    Computed as ``logit[id] - logsumexp(logits)`` in float32, which avoids allocating the full
    ``log_softmax`` output and loses no precision for bf16 models.
    """
    if logits.shape[:-1] != token_ids.shape:
        raise ValueError(
            f"nexrl.algorithms.token_logprobs: logits {tuple(logits.shape)} and token_ids "
            f"{tuple(token_ids.shape)} disagree on the leading dimensions"
        )
    if temperature <= 0:
        raise ValueError(f"nexrl.algorithms.token_logprobs: temperature must be > 0, got {temperature}")
    lead = token_ids.shape
    flat_logits = logits.reshape(-1, logits.shape[-1])
    flat_ids = token_ids.reshape(-1, 1).long()
    out = []
    for a, b in _row_chunks(flat_logits.shape[0], chunk_rows):
        chunk = flat_logits[a:b].float()
        if temperature != 1.0:
            chunk = chunk / temperature
        picked = chunk.gather(-1, flat_ids[a:b]).squeeze(-1)
        out.append(picked - torch.logsumexp(chunk, dim=-1))
    if not out:
        return flat_logits.new_zeros(lead, dtype=torch.float32)
    return torch.cat(out).reshape(lead)


def entropy_from_logits(
    logits: Tensor,
    *,
    temperature: float = 1.0,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
) -> Tensor:
    """Entropy ``H = -sum_v p_v log p_v`` of ``softmax(logits / temperature)`` per position.

    Uses ``H = logsumexp(z) - sum_v softmax(z)_v * z_v``, which never takes the log of a
    probability that underflowed to 0 (the naive form gives ``0 * -inf = NaN``); ``-inf``
    logits (masked-out tokens) are allowed. Returns
    ``[...]`` float32; differentiable, so it can feed the entropy bonus.
    """
    if temperature <= 0:
        raise ValueError(f"nexrl.algorithms.entropy_from_logits: temperature must be > 0, got {temperature}")
    lead = logits.shape[:-1]
    flat = logits.reshape(-1, logits.shape[-1])
    out = []
    for a, b in _row_chunks(flat.shape[0], chunk_rows):
        z = flat[a:b].float()
        if temperature != 1.0:
            z = z / temperature
        p = torch.softmax(z, dim=-1)
        # -inf logits (banned tokens) have p = 0 exactly; 0 * -inf would be NaN, so they
        # enter the sum as 0 (and get a zero gradient).
        z_finite = torch.where(torch.isneginf(z), torch.zeros_like(z), z)
        out.append(torch.logsumexp(z, dim=-1) - (p * z_finite).sum(dim=-1))
    if not out:
        return flat.new_zeros(lead, dtype=torch.float32)
    return torch.cat(out).reshape(lead)

"""Trainer plumbing around the RL math: packing trajectories into tensors, per-token logprobs
of a causal LM on response positions, micro-batches, learning-rate schedules, the optimizer.

Layout of a packed micro-batch (right padding, as the brief and HF defaults expect)::

    input_ids  row b:  p0 p1 .. p(P-1) r0 r1 .. r(R-1) pad pad ..     width L = max(P + R)
    logits     row b:  position t predicts token t+1, so response token r_j is scored by
                       the logits at position P - 1 + j  (resp_index[b, j])
    [B, T] response tensors (T = max R): response_ids, mask (response_mask, 0 on padding),
                       engine logprobs; everything the loss sees is [B, T].

Right padding keeps every real token at its natural position (0..P+R-1), so the model's
default position ids are right and no real token ever attends to a pad (pads come after it
under the causal mask). Prompts must be non-empty (the first response token needs a
predecessor); an empty response is allowed and contributes nothing (its mask is empty).

Everything here imports torch lazily, so `nodes/trainer.py` can be imported (and its config
validated) without torch.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

LR_SCHEDULES = ("constant", "cosine", "linear")


@dataclass
class Sample:
    """One training sequence: prompt + response token ids, the response's loss mask and,
    when it came from an engine, the engine's logprob of each response token."""

    prompt_ids: list[int]
    response_ids: list[int]
    response_mask: list[float]
    engine_logprobs: list[float] | None = None

    def __post_init__(self) -> None:
        if not self.prompt_ids:
            raise ValueError("trainer: a sample has an empty prompt (the first response token "
                             "needs at least one token before it)")
        r = len(self.response_ids)
        if len(self.response_mask) != r:
            raise ValueError(f"trainer: response_mask has {len(self.response_mask)} entries for "
                             f"{r} response tokens")
        if self.engine_logprobs is not None and len(self.engine_logprobs) != r:
            raise ValueError(f"trainer: response_logprobs has {len(self.engine_logprobs)} "
                             f"entries for {r} response tokens")

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.response_ids)


def _as_list(x: Any, kind: type) -> list:
    """A trajectory field (numpy array, tensor or list) as a plain list of `kind`."""
    if hasattr(x, "tolist"):
        x = x.tolist()
    return [kind(v) for v in x]


def sample_from_trajectory(traj: dict[str, Any]) -> Sample:
    """The Sample of a `trajectory.put` / `batch.request.reply` trajectory (proto/schema.json)."""
    try:
        lp = traj.get("response_logprobs")
        return Sample(prompt_ids=_as_list(traj["prompt_ids"], int),
                      response_ids=_as_list(traj["response_ids"], int),
                      response_mask=_as_list(traj["response_mask"], float),
                      engine_logprobs=None if lp is None else _as_list(lp, float))
    except KeyError as e:
        raise ValueError(f"trainer: trajectory {traj.get('traj_id', '?')} lacks field {e}") from e


@dataclass
class Packed:
    """A right-padded micro-batch (see the module docstring); every tensor on one device."""

    input_ids: Any        # [B, L] long
    attention_mask: Any   # [B, L] long
    resp_index: Any       # [B, T] long: logits position that scores response token j
    response_ids: Any     # [B, T] long (0 on padding)
    mask: Any             # [B, T] float32 (response_mask; 0 on padding)
    engine_logp: Any      # [B, T] float32, or None when any sample lacks engine logprobs

    @property
    def width(self) -> int:
        return int(self.response_ids.shape[1])


def pack(samples: Sequence[Sample], pad_id: int, device: Any = "cpu") -> Packed:
    """Right-pad `samples` into one micro-batch."""
    import torch

    if not samples:
        raise ValueError("trainer: cannot pack an empty micro-batch")
    b = len(samples)
    L = max(s.num_tokens for s in samples)
    T = max(1, max(len(s.response_ids) for s in samples))
    ids = torch.full((b, L), pad_id, dtype=torch.long)
    att = torch.zeros((b, L), dtype=torch.long)
    idx = torch.zeros((b, T), dtype=torch.long)
    rid = torch.zeros((b, T), dtype=torch.long)
    mask = torch.zeros((b, T), dtype=torch.float32)
    have_engine = all(s.engine_logprobs is not None for s in samples)
    elp = torch.zeros((b, T), dtype=torch.float32) if have_engine else None
    for i, s in enumerate(samples):
        p, r = len(s.prompt_ids), len(s.response_ids)
        ids[i, :p + r] = torch.tensor(s.prompt_ids + s.response_ids, dtype=torch.long)
        att[i, :p + r] = 1
        # response token j is scored at position p-1+j; padding columns point at the last
        # real position (any valid index works: their mask is 0)
        idx[i] = torch.clamp(torch.arange(T) + (p - 1), max=p + r - 1)
        if r:
            rid[i, :r] = torch.tensor(s.response_ids, dtype=torch.long)
            mask[i, :r] = torch.tensor(s.response_mask, dtype=torch.float32)
            if elp is not None:
                elp[i, :r] = torch.tensor(s.engine_logprobs, dtype=torch.float32)
    dev = torch.device(device)
    return Packed(ids.to(dev), att.to(dev), idx.to(dev), rid.to(dev), mask.to(dev),
                  None if elp is None else elp.to(dev))


def pad_rows(rows: Sequence[Any], width: int) -> Any:
    """Stack 1-D float tensors of different lengths into [B, width], zero padded."""
    import torch

    out = torch.zeros((len(rows), width), dtype=torch.float32, device=rows[0].device)
    for i, r in enumerate(rows):
        n = min(int(r.shape[0]), width)
        out[i, :n] = r[:n]
    return out


def unpad_rows(x: Any, lengths: Sequence[int]) -> list[Any]:
    """Inverse of pad_rows: row i's first lengths[i] values (detached)."""
    return [x[i, :n].detach().clone() for i, n in enumerate(lengths)]


def autocast_for(device: Any, dtype_name: str) -> Callable[[], Any]:
    """A context-manager factory: bf16/fp16 autocast on CUDA, nothing on CPU or for 'none'."""
    import torch

    dev = torch.device(device)
    if dev.type != "cuda" or dtype_name == "none":
        return nullcontext
    dt = getattr(torch, dtype_name)
    return lambda: torch.autocast("cuda", dtype=dt)


def response_logits(model: Any, packed: Packed, autocast: Callable[[], Any] = nullcontext) -> Any:
    """[B, T, V] logits scoring each response token (float as the model computed them)."""
    import torch

    with autocast():
        out = model(input_ids=packed.input_ids, attention_mask=packed.attention_mask,
                    use_cache=False)
    logits = out.logits
    rows = torch.arange(logits.shape[0], device=logits.device).unsqueeze(-1)
    return logits[rows, packed.resp_index]


def sequence_logprobs(model: Any, samples: Sequence[Sample], *, pad_id: int, device: Any,
                      micro_batch_size: int, temperature: float = 1.0,
                      autocast: Callable[[], Any] = nullcontext) -> list[Any]:
    """Per-sample [R_i] logprobs of the response tokens, without gradient (old / reference
    policy), computed one micro-batch at a time."""
    import torch

    from nexrl.algorithms import token_logprobs

    out: list[Any] = []
    with torch.no_grad():
        for chunk in chunks(list(samples), micro_batch_size):
            packed = pack(chunk, pad_id, device)
            lp = token_logprobs(response_logits(model, packed, autocast), packed.response_ids,
                                temperature=temperature)
            out += unpad_rows(lp.float(), [len(s.response_ids) for s in chunk])
    return out


def chunks(items: Sequence[Any], size: int) -> Iterator[list[Any]]:
    """Consecutive slices of at most `size` items (the micro-batches of a mini-batch)."""
    if size < 1:
        raise ValueError(f"trainer: micro_batch_size must be >= 1, got {size}")
    for i in range(0, len(items), size):
        yield list(items[i:i + size])


def split_even(items: Sequence[Any], parts: int) -> list[list[Any]]:
    """`parts` consecutive slices whose sizes differ by at most one (mini-batches)."""
    n = len(items)
    parts = max(1, min(parts, n))
    bounds = [round(i * n / parts) for i in range(parts + 1)]
    return [list(items[bounds[i]:bounds[i + 1]]) for i in range(parts)]


# ----------------------------------------------------------------------------- schedule
def lr_factor(step: int, *, schedule: str, warmup_steps: int, total_steps: int,
              min_lr_ratio: float) -> float:
    """Multiplier of the base lr for the `step`-th optimizer step (0-based).

    Linear warmup from lr/warmup_steps to lr over the first `warmup_steps` steps (the first step
    is never taken at lr 0), then "constant" (1), "cosine" (half cosine down to min_lr_ratio at
    total_steps) or "linear" (straight line down to min_lr_ratio at total_steps).
    """
    if schedule not in LR_SCHEDULES:
        raise ValueError(f"trainer: lr_schedule {schedule!r} is not one of {LR_SCHEDULES}")
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    if schedule == "cosine":
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return min_lr_ratio + (1 - min_lr_ratio) * (1 - progress)


def build_optimizer(model: Any, *, lr: float, weight_decay: float, betas: Sequence[float],
                    eps: float, schedule: str, warmup_steps: int, total_steps: int,
                    min_lr_ratio: float) -> tuple[Any, Any]:
    """AdamW over the trainable parameters + a LambdaLR stepped once per trainer step.

    Biases and norm weights (1-D parameters) get no weight decay, as is usual for LMs.
    """
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    opt = torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=tuple(betas),
                            eps=eps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(
        s, schedule=schedule, warmup_steps=warmup_steps, total_steps=total_steps,
        min_lr_ratio=min_lr_ratio))
    return opt, sched


def clip_and_norm(model: Any, max_norm: float) -> float:
    """Clip the gradient's global L2 norm to `max_norm` (<= 0: no clipping); return the norm
    before clipping (what is logged as train/grad_norm)."""
    import torch

    params = [p for p in model.parameters() if p.grad is not None]
    if not params:
        return 0.0
    limit = max_norm if max_norm > 0 else float("inf")
    return float(torch.nn.utils.clip_grad_norm_(params, limit))

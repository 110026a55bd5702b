"""KV cache of the running batch: rows join and leave between decode steps.

The batch's keys/values live in a transformers ``DynamicCache`` (one layer object per decoder
layer, tensors ``[rows, kv_heads, slots, head_dim]``) next to a ``[rows, slots]`` 0/1 mask
that says which cache slots hold a real token of that row. Rows are *left-padded*: every
row's newest token sits in the last slot, so one decode step appends one slot for all rows.

Why this layout works with an unmodified HF model:
- the causal mask is built in slot space (query = last slot, keys = all earlier slots), and
  the 2D mask removes pad slots, so a row never attends to another row's padding;
- RoPE positions come from explicit per-row ``position_ids`` (real tokens so far), not from
  slot indices, so padding does not shift positions;
- pad slots hold zeros (or, after a padded prefill, finite junk) and are always masked.

Join (``merge``): left-pad the shorter of the two caches along the slot axis, concatenate
along the row axis. Leave (``select``): keep some rows, then drop leading slots that are
padding in every remaining row, so the cache never grows beyond the longest live row.
Only full-attention layers are supported (the engine refuses sliding-window configs).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import DynamicCache


def _layers(cache: DynamicCache | None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(keys, values) per layer, or [] for an empty cache."""
    if cache is None:
        return []
    out = []
    for layer in cache.layers:
        if getattr(layer, "keys", None) is None or layer.keys.numel() == 0:
            return []
        out.append((layer.keys, layer.values))
    return out


def _cache_of(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> DynamicCache | None:
    return DynamicCache(ddp_cache_data=pairs) if pairs else None


@dataclass
class BatchKV:
    """Keys/values + slot mask of the running batch (see module docstring)."""

    cache: DynamicCache | None
    """The model's cache object; None while no row has any token in the cache yet."""
    mask: torch.Tensor
    """[rows, slots] long tensor, 1 where the slot holds a real token of that row."""

    @classmethod
    def empty(cls, rows: int, device: torch.device) -> "BatchKV":
        return cls(None, torch.zeros((rows, 0), dtype=torch.long, device=device))

    @property
    def rows(self) -> int:
        return self.mask.shape[0]

    @property
    def slots(self) -> int:
        return self.mask.shape[1]

    def select(self, keep: list[int]) -> None:
        """Keep only rows ``keep`` (in that order), then trim all-padding leading slots."""
        idx = torch.tensor(keep, dtype=torch.long, device=self.mask.device)
        self.mask = self.mask.index_select(0, idx)
        pairs = [(k.index_select(0, idx), v.index_select(0, idx)) for k, v in _layers(self.cache)]
        lead = 0
        if self.rows and self.slots:
            # leading all-zero slots: the smallest per-row count of pad slots before token 1
            lead = int((self.mask.cumsum(dim=1) == 0).sum(dim=1).min())
        elif self.slots:
            lead = self.slots
        if lead:
            self.mask = self.mask[:, lead:]
            pairs = [(k[:, :, lead:], v[:, :, lead:]) for k, v in pairs]
        if self.slots == 0 or self.rows == 0:
            pairs = []
        self.cache = _cache_of(pairs)

    def merge(self, other: "BatchKV") -> None:
        """Append ``other``'s rows after this batch's rows (left-padding the shorter)."""
        slots = max(self.slots, other.slots)
        mine, theirs = _layers(self.cache), _layers(other.cache)

        def pad(pairs, n_rows, have, like):
            if have == slots:
                return pairs
            if not pairs:  # no tensors yet: zeros shaped like the other side
                return [(k.new_zeros((n_rows, *k.shape[1:2], slots, k.shape[3])),
                         v.new_zeros((n_rows, *v.shape[1:2], slots, v.shape[3])))
                        for k, v in like]
            return [(F.pad(k, (0, 0, slots - have, 0)), F.pad(v, (0, 0, slots - have, 0)))
                    for k, v in pairs]

        if slots:
            a = pad(mine, self.rows, self.slots, theirs)
            b = pad(theirs, other.rows, other.slots, mine)
            pairs = [(torch.cat([ka, kb]), torch.cat([va, vb])) for (ka, va), (kb, vb)
                     in zip(a, b)]
        else:
            pairs = []
        self.mask = torch.cat([F.pad(self.mask, (slots - self.slots, 0)),
                               F.pad(other.mask, (slots - other.slots, 0))])
        self.cache = _cache_of(pairs)

    def forward_cache(self) -> DynamicCache:
        """The cache object to hand to the model for the next step (created if empty)."""
        if self.cache is None:
            self.cache = DynamicCache()
        return self.cache


def left_pad(seqs: list[list[int]], pad_id: int, device: torch.device
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Left-pad token lists into (input_ids, attention_mask, position_ids), each [b, max_len].

    Positions count real tokens only (pads get position 0, and are masked anyway).
    """
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, s in enumerate(seqs):
        if s:
            ids[row, width - len(s):] = torch.tensor(s, dtype=torch.long)
            mask[row, width - len(s):] = 1
    pos = (mask.cumsum(dim=1) - 1).clamp(min=0)
    return ids.to(device), mask.to(device), pos.to(device)

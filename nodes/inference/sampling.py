"""Per-row sampling for a batch of next-token logits, with the logprob of each chosen token.

What the returned logprob means (the number the trainer compares against):

    logprob = log_softmax(filter(logits / temperature))[token]

where ``filter`` keeps the top-k logits, then the smallest set whose probability mass reaches
top_p, and sets the rest to -inf (so the kept probabilities are renormalised). It is the
log-probability of the token *under the distribution it was sampled from*. With the RL
defaults temperature=1, top_p=1, top_k=0 the filter keeps everything and the logprob is the
plain model logprob ``log_softmax(logits)[token]`` -- exactly what the trainer recomputes, so
the train/infer mismatch it reports is numerical only.

Greedy rows (temperature 0) take ``argmax(logits)``; the sampling distribution is a point
mass, so instead of a constant 0 they report the plain model logprob (temperature 1, no
filter), which is the informative number.

Sampling uses the exponential race: ``argmax(p / E)`` with ``E ~ Exp(1)`` i.i.d. per vocab
entry draws exactly from ``p``. Rows with a seed draw their noise from their own
``torch.Generator`` (so a seeded request is reproducible whatever else is in the batch);
all other rows share one draw from the engine's generator.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Largest number of alternatives per token a request may ask for (OpenAI's chat limit).
MAX_TOP_LOGPROBS = 20


@dataclass(frozen=True, kw_only=True)
class SamplingParams:
    """How one sequence is sampled and when it stops."""

    max_tokens: int = 16
    """Most completion tokens to generate (>= 1)."""
    temperature: float = 1.0
    """Logit divisor; 0 means greedy."""
    top_p: float = 1.0
    """Nucleus mass in (0, 1]; 1 disables."""
    top_k: int = 0
    """Keep the k most likely tokens; 0 (or -1, sglang's spelling) disables."""
    stop: tuple[str, ...] = ()
    """Stop when the completion text contains one of these strings."""
    stop_token_ids: tuple[int, ...] = ()
    """Stop when one of these token ids is sampled (in addition to eos)."""
    ignore_eos: bool = False
    """Keep generating past eos tokens (benchmarks, fixed-length rollouts)."""
    seed: int | None = None
    """Per-sequence RNG seed; None uses the engine's shared generator."""
    top_logprobs: int = 0
    """How many most-likely alternatives (and their logprobs) to record per token."""

    def validate(self) -> None:
        """Raise ValueError naming the first invalid field."""
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) \
                or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be a positive integer, got {self.max_tokens!r}")
        if not 0.0 <= self.temperature <= 100.0:
            raise ValueError(f"temperature must be in [0, 100], got {self.temperature!r}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.top_k < -1:
            raise ValueError(f"top_k must be -1, 0 or positive, got {self.top_k!r}")
        if not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
            raise ValueError(f"top_logprobs must be in [0, {MAX_TOP_LOGPROBS}], "
                             f"got {self.top_logprobs!r}")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must be non-empty")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def filtered(self) -> bool:
        """Whether top-k / top-p change the distribution for this row."""
        return not self.greedy and (self.top_k > 0 or self.top_p < 1.0)


def _filter_top_k_top_p(scaled: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor
                        ) -> torch.Tensor:
    """Set logits outside each row's top-k, then outside its top-p nucleus, to -inf.

    ``scaled`` is [R, V]; ``top_k`` [R] (0: off) and ``top_p`` [R] (1: off). The nucleus is
    computed on the top-k-renormalised distribution; the most likely token is always kept.
    """
    sorted_logits, order = scaled.sort(dim=-1, descending=True)
    vocab = scaled.shape[-1]
    ranks = torch.arange(vocab, device=scaled.device).unsqueeze(0)
    k = torch.where(top_k > 0, top_k, torch.full_like(top_k, vocab)).unsqueeze(1)
    sorted_logits = sorted_logits.masked_fill(ranks >= k, float("-inf"))
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs
    drop = mass_before >= top_p.unsqueeze(1)
    drop[:, 0] = False
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(scaled).scatter_(-1, order, sorted_logits)


def sample_rows(logits: torch.Tensor, params: list[SamplingParams],
                generators: list[torch.Generator | None], shared: torch.Generator,
                top_n: int = 0
                ) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
    """Sample one token per row of ``logits`` ([B, V], any float dtype).

    Returns ``(tokens [B] long, logprobs [B] float32, top)`` where ``top`` is ``None`` when
    ``top_n`` is 0, else ``(values [B, top_n], ids [B, top_n])``: the ``top_n`` most likely
    tokens of each row's distribution (the same one the logprob refers to).
    """
    logits = logits.float()
    rows, device = logits.shape[0], logits.device
    temps = torch.tensor([p.temperature if not p.greedy else 1.0 for p in params],
                         dtype=torch.float32, device=device)
    scaled = logits / temps.unsqueeze(1)
    filt = [i for i, p in enumerate(params) if p.filtered]
    if filt:
        idx = torch.tensor(filt, device=device)
        top_k = torch.tensor([max(params[i].top_k, 0) for i in filt], device=device)
        top_p = torch.tensor([params[i].top_p for i in filt], dtype=torch.float32,
                             device=device)
        scaled[idx] = _filter_top_k_top_p(scaled[idx], top_k, top_p)
    logp = torch.log_softmax(scaled, dim=-1)

    tokens = torch.argmax(logits, dim=-1)
    sampled = [i for i, p in enumerate(params) if not p.greedy]
    if sampled:
        noise = torch.empty((rows, logits.shape[1]), dtype=torch.float32, device=device)
        unseeded = [i for i in sampled if generators[i] is None]
        if unseeded:
            noise[unseeded] = torch.empty((len(unseeded), logits.shape[1]), device=device
                                          ).exponential_(generator=shared)
        for i in sampled:
            if generators[i] is not None:
                noise[i].exponential_(generator=generators[i])
        # Exp(1) can round to 0; clamp so log() stays finite and filtered (-inf) tokens lose.
        race = logp - noise.clamp_min_(torch.finfo(torch.float32).tiny).log()
        idx = torch.tensor(sampled, device=device)
        tokens[idx] = torch.argmax(race[idx], dim=-1)
    chosen = logp.gather(1, tokens.unsqueeze(1)).squeeze(1)
    top = None
    if top_n > 0:
        values, ids = logp.topk(min(top_n, logp.shape[1]), dim=-1)
        top = (values, ids)
    return tokens, chosen, top

"""How a rollout worker turns one task (a prompt, n samples) into trajectories.

The default, `SingleTurnWorkflow`, renders the prompt once, asks an engine for n samples in one
request and rewards each with the evaluator. For multi-turn episodes (retries, tools, games)
subclass `RolloutWorkflow` and name it in the recipe (`rollout.rollout_class:
"path/to/file.py:MyWorkflow"`, constructor keyword arguments in `rollout.rollout_args`):

    class TryAgain(RolloutWorkflow):
        async def run_sample(self, task, ctx, index):
            ep = Episode(ctx.prompt_ids())                        # the rendered prompt
            first = (await ctx.generate(ep.context_ids(), n=1))[0]
            ep.add_model(first)                                   # mask 1, engine logprobs
            ep.add_env(ctx.tokenize_turn([{"role": "user", "content": "Try again."}],
                                         after=first.response_ids))   # mask 0, logprob 0
            second = (await ctx.generate(ep.context_ids(), n=1))[0]
            ep.add_model(second)
            result = await ctx.evaluate(ctx.decode(second.response_ids))
            return ep.to_trajectory(result)

Token bookkeeping across turns (why the ids are never re-derived from text): the next turn's
prompt is exactly previous prompt ids + the model's response ids (as sampled) + the ids of the
environment's message. Re-tokenizing the conversation text could merge or split tokens
differently at the boundaries, and the trainer would then compute logprobs of tokens the model
never sampled. `ctx.tokenize_turn` gives the environment ids with the chat template's own
framing: what closes the assistant turn (minus the stop token the model already emitted), then
the new messages, then the header of the next assistant turn.

A trajectory's `weight_version` is the oldest version that produced any of its model tokens
(`weight_version_max` the newest): a multi-turn episode can span a weight update.
"""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from .evaluators import EvaluationRunResult, EvaluationTarget, Evaluator
from .rollout_engines import EnginePool, Sample, SamplingConfig

_SENTINEL = "\x00NEXRL_TURN_END\x00"


@dataclass
class Trajectory:
    """One finished episode, as a workflow returns it (the node adds ids and routing)."""

    prompt_ids: list[int]
    response_ids: list[int]
    response_mask: list[int]           # 1 = model token (trained on), 0 = environment token
    response_logprobs: list[float]     # engine logprob per model token, 0 for environment ones
    reward: float
    weight_version: int
    weight_version_max: int
    finish_reason: str
    metrics: dict[str, float] = field(default_factory=dict)
    timing: dict[str, float] = field(default_factory=dict)


@dataclass
class Episode:
    """Token bookkeeping of one (possibly multi-turn) episode; see the module docstring."""

    prompt_ids: list[int]
    response_ids: list[int] = field(default_factory=list)
    response_mask: list[int] = field(default_factory=list)
    response_logprobs: list[float] = field(default_factory=list)
    versions: list[int] = field(default_factory=list)
    finish_reason: str = ""
    generate_s: float = 0.0
    turns: list[dict[str, Any]] = field(default_factory=list)

    def context_ids(self) -> list[int]:
        """What the model sees next: prompt + everything appended so far."""
        return self.prompt_ids + self.response_ids

    def add_model(self, sample: Sample) -> "Episode":
        """Append a model turn: its ids with mask 1 and the engine's logprobs."""
        self.response_ids += sample.response_ids
        self.response_mask += [1] * len(sample.response_ids)
        self.response_logprobs += sample.logprobs
        self.versions += [sample.weight_version, sample.weight_version_max]
        self.finish_reason = sample.finish_reason
        self.generate_s += sample.generate_s
        self.turns.append({"role": "assistant", "num_tokens": len(sample.response_ids)})
        return self

    def add_env(self, ids: list[int], role: str = "user") -> "Episode":
        """Append environment/tool tokens: mask 0, logprob 0 (never trained on)."""
        self.response_ids += list(ids)
        self.response_mask += [0] * len(ids)
        self.response_logprobs += [0.0] * len(ids)
        self.turns.append({"role": role, "num_tokens": len(ids)})
        return self

    def to_trajectory(self, result: EvaluationRunResult, reward_s: float = 0.0) -> Trajectory:
        if not self.versions:
            raise ValueError("Episode.to_trajectory: the episode has no model turn")
        return Trajectory(prompt_ids=list(self.prompt_ids), response_ids=list(self.response_ids),
                          response_mask=list(self.response_mask),
                          response_logprobs=list(self.response_logprobs),
                          reward=float(result.reward), weight_version=min(self.versions),
                          weight_version_max=max(self.versions),
                          finish_reason=self.finish_reason, metrics=dict(result.metrics),
                          timing={"generate_s": self.generate_s, "reward_s": reward_s})


class RolloutContext:
    """What a workflow may use for one task: the tokenizer, the engines, the evaluator.

    Built by the rollout node per leased task; `task` is the dataloader's item
    ({item_id, group_id, mode, n, row, prompt, data_source, ...})."""

    def __init__(self, task: dict[str, Any], *, tokenizer: Any, engines: EnginePool,
                 sampling: SamplingConfig, evaluator: Evaluator, evaluator_timeout_s: float,
                 system_prompt: str = "", run_blocking: Callable[..., Any] | None = None,
                 on_error: Callable[[str, str], None] | None = None):
        self.task, self.tokenizer, self.engines = task, tokenizer, engines
        self.sampling, self.evaluator = sampling, evaluator
        self.evaluator_timeout_s, self.system_prompt = evaluator_timeout_s, system_prompt
        self._run_blocking = run_blocking or (lambda fn, *a: asyncio.to_thread(fn, *a))
        self._on_error = on_error or (lambda code, msg: None)
        self.reward_s = 0.0
        self.evaluator_errors = 0

    # ------------------------------------------------------------------ tokens
    def render(self, messages: list[dict[str, Any]]) -> list[int]:
        """Chat messages -> prompt ids (chat template, generation prompt added)."""
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                  tokenize=False)
        return self.tokenizer.encode(text, add_special_tokens=False)

    def prompt_ids(self, prompt: Any = None) -> list[int]:
        """The task's prompt as ids: a message list goes through the chat template (with
        rollout.system_prompt first, if set); a string is used verbatim (base-model tasks)."""
        prompt = self.task["prompt"] if prompt is None else prompt
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt, add_special_tokens=False)
        messages = list(prompt)
        if self.system_prompt and not (messages and messages[0].get("role") == "system"):
            messages.insert(0, {"role": "system", "content": self.system_prompt})
        return self.render(messages)

    def tokenize_turn(self, messages: list[dict[str, Any]], after: list[int]) -> list[int]:
        """Ids to append after a model turn that produced `after`, so that the context then
        ends with `messages` and the next assistant header (see the module docstring)."""
        tok = self.tokenizer
        base = [{"role": "user", "content": "x"}, {"role": "assistant", "content": _SENTINEL}]
        closed = tok.apply_chat_template(base, tokenize=False)
        full = tok.apply_chat_template(base + list(messages), add_generation_prompt=True,
                                       tokenize=False)
        if not full.startswith(closed) or _SENTINEL not in closed:
            raise ValueError("tokenize_turn: this chat template does not render a conversation "
                             "as a prefix of its continuation; write the turn's ids yourself")
        turn_end = closed[closed.rindex(_SENTINEL) + len(_SENTINEL):]
        last = tok.decode(after[-1:], skip_special_tokens=False) if after else ""
        closing = turn_end[len(last):] if last and turn_end.startswith(last) else turn_end
        return tok.encode(closing + full[len(closed):], add_special_tokens=False)

    def decode(self, ids: list[int]) -> str:
        """Response text for evaluators (special tokens skipped)."""
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    # ------------------------------------------------------------------ engines, rewards
    async def generate(self, prompt_ids: list[int], n: int = 1, **overrides: Any) -> list[Sample]:
        """n samples continuing `prompt_ids` (sampling fields may be overridden per call,
        e.g. max_tokens=16). Raises EngineUnavailable / EngineRequestError."""
        return await self.engines.generate(prompt_ids, n, {**self.sampling.body(), **overrides})

    async def evaluate(self, final_answer: str, *, response_ids: list[int] | None = None,
                       finish_reason: str = "", observation: list[dict[str, Any]] | None = None
                       ) -> EvaluationRunResult:
        """The evaluator's verdict on the task's row; never raises: a failing, slow (past
        evaluator_timeout_s) or malformed evaluator gives reward 0 + metric evaluator_error."""
        target = EvaluationTarget(final_answer=final_answer, observation=observation or [],
                                  response_ids=list(response_ids or []), finish_reason=finish_reason)
        t0 = time.monotonic()
        try:
            fn = self.evaluator.evaluate
            if asyncio.iscoroutinefunction(fn):
                call = fn(self.task["row"], target)
            else:
                call = self._run_blocking(fn, self.task["row"], target)
            result = await asyncio.wait_for(call, self.evaluator_timeout_s)
            if not isinstance(result, EvaluationRunResult):
                raise TypeError(f"evaluate() returned {type(result).__name__}, not EvaluationRunResult")
            reward = float(result.reward)
            if not math.isfinite(reward):
                raise ValueError(f"evaluate() returned a non-finite reward {result.reward!r}")
            metrics = {str(k): float(v) for k, v in (result.metrics or {}).items()}
            result = EvaluationRunResult(reward, result.ground_truth, metrics, result.extra_info)
        except Exception as e:  # noqa: BLE001 -- user code: any failure becomes reward 0
            self.evaluator_errors += 1
            why = "timed out" if isinstance(e, asyncio.TimeoutError) else f"{type(e).__name__}: {e}"
            self._on_error("evaluator_error", f"evaluator {type(self.evaluator).__name__} on item "
                                              f"{self.task.get('item_id')}: {why}")
            result = EvaluationRunResult(reward=0.0, metrics={"evaluator_error": 1.0})
        self.reward_s += time.monotonic() - t0
        return result


class RolloutWorkflow:
    """Base of custom rollouts: override `run_sample` (one episode; run n times concurrently)
    or `run_group` (all n at once). Keyword arguments come from rollout.rollout_args."""

    def __init__(self, **kwargs: Any) -> None:
        if kwargs:
            raise TypeError(f"{type(self).__name__} takes no rollout_args, got {sorted(kwargs)}")

    async def run_group(self, task: dict[str, Any], ctx: RolloutContext) -> list[Trajectory]:
        """task["n"] trajectories for the task, in sample order."""
        return list(await asyncio.gather(*(self.run_sample(task, ctx, i)
                                           for i in range(int(task["n"])))))

    async def run_sample(self, task: dict[str, Any], ctx: RolloutContext, index: int) -> Trajectory:
        raise NotImplementedError(f"{type(self).__name__} must override run_sample or run_group")


class SingleTurnWorkflow(RolloutWorkflow):
    """The default: one prompt, n samples in one engine request, one evaluator call each."""

    async def run_group(self, task: dict[str, Any], ctx: RolloutContext) -> list[Trajectory]:
        prompt = ctx.prompt_ids()
        samples = await ctx.generate(prompt, n=int(task["n"]))

        async def judge(s: Sample) -> Trajectory:
            t0 = time.monotonic()
            result = await ctx.evaluate(ctx.decode(s.response_ids), response_ids=s.response_ids,
                                        finish_reason=s.finish_reason)
            return Episode(prompt).add_model(s).to_trajectory(result, time.monotonic() - t0)

        return list(await asyncio.gather(*(judge(s) for s in samples)))


# ----------------------------------------------------------------------------- wire format
def _wire(task: dict[str, Any], i: int, worker: str, prompt: list[int], response: list[int],
          mask: list[int], logprobs: list[float], reward: float, version: int, version_max: int,
          finish: str, metrics: dict[str, float], timing: dict[str, float]) -> dict[str, Any]:
    import numpy as np

    d = dict(traj_id=f"{task['group_id']}/{i}", item_id=task["item_id"], group_id=task["group_id"],
             sample_index=i, group_size=int(task["n"]), mode=task["mode"],
             prompt_ids=np.asarray(prompt, dtype=np.int32),
             response_ids=np.asarray(response, dtype=np.int32),
             response_mask=np.asarray(mask, dtype=np.uint8),
             response_logprobs=np.asarray(logprobs, dtype=np.float32),
             weight_version=int(version), weight_version_max=int(version_max),
             reward=float(reward), finish_reason=str(finish),
             data_source=str(task.get("data_source") or "unknown"),
             metrics={str(k): float(x) for k, x in metrics.items()},
             timing={str(k): float(x) for k, x in timing.items()}, worker=worker)
    if task["mode"] == "validate":
        d["validation_id"] = str(task.get("validation_id", ""))
    return d


def to_wire(task: dict[str, Any], trajs: Any, worker: str) -> list[dict[str, Any]]:
    """A workflow's trajectories as trajectory.put maps (the fields proto/schema.json lists;
    arrays as numpy int32 / uint8 / float32). Raises ValueError for a malformed result:
    not exactly task["n"] trajectories, an empty prompt or response, or response ids, mask
    and logprobs of different lengths."""
    n = int(task["n"])
    if not isinstance(trajs, list) or len(trajs) != n:
        got = len(trajs) if isinstance(trajs, list) else type(trajs).__name__
        raise ValueError(f"workflow returned {got} trajectories for a task of n={n}")
    out = []
    for i, t in enumerate(trajs):
        if not isinstance(t, Trajectory):
            raise ValueError(f"trajectory {i} is a {type(t).__name__}, not a Trajectory")
        lens = {len(t.response_ids), len(t.response_mask), len(t.response_logprobs)}
        if len(lens) != 1 or not t.response_ids or not t.prompt_ids:
            raise ValueError(f"trajectory {i}: prompt and response must be non-empty and the "
                             f"response ids, mask and logprobs of one length (got {sorted(lens)})")
        out.append(_wire(task, i, worker, t.prompt_ids, t.response_ids, t.response_mask,
                         t.response_logprobs, t.reward, t.weight_version, t.weight_version_max,
                         t.finish_reason, t.metrics, t.timing))
    return out


def failed_wire(task: dict[str, Any], version: int, worker: str) -> list[dict[str, Any]]:
    """task["n"] zero-reward placeholders for a validation item that cannot be generated (so
    the validation pass still completes): empty arrays, finish_reason "error", metrics
    error = 1, correct = 0."""
    return [_wire(task, i, worker, [], [], [], [], 0.0, version, version, "error",
                  {"error": 1.0, "correct": 0.0}, {}) for i in range(int(task["n"]))]

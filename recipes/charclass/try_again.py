"""A multi-turn rollout for the charclass task: answer, hear "try again", answer again.

    rollout:
      rollout_class: "recipes/charclass/try_again.py:TryAgainWorkflow"
      rollout_args: {max_turns: 2}

Each episode is one trajectory whose response is

    [answer 1 (model, mask 1)] [feedback turn (environment, mask 0)] [answer 2 (model, mask 1)]

built with nexrl.rollout_workflow.Episode: the second answer is generated from exactly
prompt ids + answer-1 ids + feedback ids (never from re-tokenized text), and the trainer
learns only from the model's tokens. The reward is the last answer's. It shows the token
bookkeeping a tool-use or game workflow needs; it is not expected to learn faster than the
single-turn recipe.
"""

from __future__ import annotations

import time
from typing import Any

from nexrl.rollout_workflow import Episode, RolloutContext, RolloutWorkflow, Trajectory


class TryAgainWorkflow(RolloutWorkflow):
    """Up to `max_turns` answers; the episode ends early once an answer earns `stop_reward`."""

    def __init__(self, max_turns: int = 2, stop_reward: float = 1.0,
                 feedback: str = "Try again: write {length} {answer}.") -> None:
        if max_turns < 1:
            raise ValueError(f"TryAgainWorkflow: max_turns must be >= 1, got {max_turns}")
        self.max_turns, self.stop_reward, self.feedback = max_turns, stop_reward, feedback

    async def run_sample(self, task: dict[str, Any], ctx: RolloutContext, index: int) -> Trajectory:
        ep = Episode(ctx.prompt_ids())
        reward_s = 0.0
        first_reward = 0.0
        for turn in range(self.max_turns):
            sample = (await ctx.generate(ep.context_ids(), n=1))[0]
            ep.add_model(sample)
            t0 = time.monotonic()
            result = await ctx.evaluate(ctx.decode(sample.response_ids),
                                        response_ids=sample.response_ids,
                                        finish_reason=sample.finish_reason, observation=ep.turns)
            reward_s += time.monotonic() - t0
            if turn == 0:
                first_reward = result.reward
            if result.reward >= self.stop_reward or turn == self.max_turns - 1:
                break
            message = {"role": "user", "content": self.feedback.format(**task["row"])}
            ep.add_env(ctx.tokenize_turn([message], after=sample.response_ids))
        result.metrics.update(turns=float(turn + 1), first_reward=float(first_reward))
        return ep.to_trajectory(result, reward_s)

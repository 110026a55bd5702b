"""Reward of the charclass task: how much of the response is in the requested character class.

A row asks for `length` characters of one class ("digits", "letters" = a-z, "capitals" = A-Z);
the reward is the fraction of the first `length` response characters (special tokens skipped)
that belong to it. Missing characters count as wrong, so stopping early never pays.

Why this shape: a random policy over the 259-token byte vocabulary already earns a little
(~10/259 of its characters are digits, ~26/259 letters), so GRPO has signal from step 0, and a
policy that ignores the prompt can earn at most ~1/3 (always the same class): a validation
reward clearly above 0.33 means the model learnt to read the request.

    evaluator: "recipes/charclass/evaluator.py:CharClassEvaluator"
"""

from __future__ import annotations

from typing import Any, Callable

from nexrl.evaluators import EvaluationRunResult, EvaluationTarget, Evaluator

#: Class name (the row's `answer`) -> membership test for one character.
CLASSES: dict[str, Callable[[str], bool]] = {
    "digits": lambda c: "0" <= c <= "9",
    "letters": lambda c: "a" <= c <= "z",
    "capitals": lambda c: "A" <= c <= "Z",
}


def char_class_reward(text: str, cls: str, length: int) -> tuple[float, int]:
    """(reward, number of the first `length` characters of `text` in class `cls`)."""
    if cls not in CLASSES:
        raise ValueError(f"charclass: unknown class {cls!r} (known: {', '.join(CLASSES)})")
    if length < 1:
        raise ValueError(f"charclass: length must be >= 1, got {length}")
    inside = sum(CLASSES[cls](c) for c in text[:length])
    return inside / length, inside


class CharClassEvaluator(Evaluator):
    """reward = fraction of the first row["length"] characters in class row["answer"]."""

    def evaluate(self, data: dict[str, Any], evaluation_target: EvaluationTarget
                 ) -> EvaluationRunResult:
        cls, length = str(data["answer"]), int(data["length"])
        reward, inside = char_class_reward(evaluation_target.final_answer, cls, length)
        return EvaluationRunResult(
            reward=reward, ground_truth=cls,
            metrics={"correct": float(inside == length), "in_class": reward,
                     "response_chars": float(len(evaluation_target.final_answer))})

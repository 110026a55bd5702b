"""Evaluators: the reward of one finished episode, and the built-in ones.

An evaluator turns (data row, what the model produced) into an `EvaluationRunResult`. The
names are the original NexRL user guide's, so its evaluators port with an import change:

    from nexrl.evaluators import Evaluator, EvaluationTarget, EvaluationRunResult

    class MyEvaluator(Evaluator):
        def evaluate(self, data, evaluation_target):
            ok = evaluation_target.final_answer.strip() == data["answer"]
            return EvaluationRunResult(reward=float(ok), ground_truth=data["answer"],
                                       metrics={"correct": float(ok)})

A recipe names one in the rollout section: `evaluator: "path/to/evaluator.py:MyEvaluator"`
(or a key of `EVALUATORS`: "exact_match", "math"), with constructor keyword arguments in
`evaluator_args`. `evaluate` may be a plain function (the rollout worker runs it on a thread
of its own, so a slow one does not stall generation) or `async def` (awaited on the worker's
event loop: use it for evaluators that call services). Rewards should lie in [0, 1];
`metrics` values must be floats; a metric named "correct" (> 0 = right) is what the
validator counts as accuracy. An evaluator that raises gets reward 0 and the metric
`evaluator_error` = 1 (the rollout worker reports the error; the node never dies from it).

Math answers (`MathEvaluator`, `extract_math_answer`, `math_equal`): the final answer is taken
from, in this order, the last `\\boxed{...}` / `\\fbox{...}`, a GSM8K-style `#### x` line, an
"answer is x" / "Answer: x" phrase, else the last number in the text; numbers are compared by
value (`1,000` = `1000.0`, `\\frac{1}{2}` = `0.5` = `1/2`), other answers as normalised LaTeX.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .plugins import PluginError, load_object


@dataclass
class EvaluationTarget:
    """What the model produced in one episode (a trajectory)."""

    #: The response text (special tokens skipped); for multi-turn episodes the last answer.
    final_answer: str
    #: Extra context for the evaluator, e.g. the turns of a multi-turn episode.
    observation: list[dict[str, Any]] = field(default_factory=list)
    #: The response token ids as the engine returned them.
    response_ids: list[int] = field(default_factory=list)
    #: Why generation stopped: "stop" (eos / stop string) or "length".
    finish_reason: str = ""


#: The original user guide's name for the evaluation target type.
BaseEvaluationTarget = EvaluationTarget


@dataclass
class EvaluationRunResult:
    """An evaluator's verdict on one episode."""

    #: The RL signal (normally in [0, 1]).
    reward: float
    #: The reference answer, as a string (logged, not trained on).
    ground_truth: str = ""
    #: Scalar metrics for logging ("correct" feeds the validator's accuracy).
    metrics: dict[str, float] = field(default_factory=dict)
    #: Anything else worth keeping for debugging (not sent on the bus).
    extra_info: dict[str, Any] = field(default_factory=dict)


class Evaluator:
    """Base class: override `evaluate` (plain or `async def`). Constructor keyword arguments
    come from the recipe's `evaluator_args`."""

    def __init__(self, **kwargs: Any) -> None:
        if kwargs:
            raise TypeError(f"{type(self).__name__} takes no evaluator_args, got {sorted(kwargs)}")

    def evaluate(self, data: dict[str, Any], evaluation_target: EvaluationTarget
                 ) -> EvaluationRunResult:
        raise NotImplementedError(f"{type(self).__name__}.evaluate is not implemented")


def _ground_truth(data: dict[str, Any], key: str, who: str) -> Any:
    if key not in data:
        raise KeyError(f"{who}: the data row has no {key!r} field (fields: "
                       f"{', '.join(sorted(map(str, data))) or 'none'}); set evaluator_args.answer_key")
    return data[key]


class ExactMatchEvaluator(Evaluator):
    """reward 1 if the response equals the row's answer after trimming and collapsing
    whitespace (and lower-casing unless case_sensitive), else 0."""

    def __init__(self, answer_key: str = "answer", case_sensitive: bool = True) -> None:
        self.answer_key, self.case_sensitive = answer_key, case_sensitive

    def _norm(self, s: str) -> str:
        s = " ".join(str(s).split())
        return s if self.case_sensitive else s.lower()

    def evaluate(self, data: dict[str, Any], evaluation_target: EvaluationTarget
                 ) -> EvaluationRunResult:
        truth = _ground_truth(data, self.answer_key, "exact_match evaluator")
        truths = truth if isinstance(truth, list) else [truth]
        got = self._norm(evaluation_target.final_answer)
        ok = any(got == self._norm(t) for t in truths)
        return EvaluationRunResult(reward=float(ok), ground_truth=str(truth),
                                   metrics={"correct": float(ok)})


# ----------------------------------------------------------------------------- math answers

_NUMBER = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?(?:/\d+)?|-?\.\d+")


def _braced(text: str, start: int) -> tuple[str, int] | None:
    """Content of the balanced {...} opening at text[start], and the index after it."""
    depth = 0
    for i in range(start, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[start + 1:i], i + 1
    return None


def last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} or \\fbox{...} (nested braces kept), or of
    `\\boxed x` without braces; None if there is none."""
    pos = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if pos < 0:
        return None
    rest = pos + (len("\\boxed") if text.startswith("\\boxed", pos) else len("\\fbox"))
    while rest < len(text) and text[rest] == " ":
        rest += 1
    if rest < len(text) and text[rest] == "{":
        got = _braced(text, rest)
        return got[0] if got else None
    m = re.match(r"[^\s$]+", text[rest:])
    return m.group(0) if m else None


def extract_math_answer(text: str) -> str | None:
    """The final answer in a model's (or a dataset's) solution text; None if none is found."""
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed.strip()
    if "####" in text:
        tail = text.rsplit("####", 1)[1].strip()
        if tail:
            return tail.splitlines()[0].strip()
    m = None
    for m in re.finditer(r"(?:answer is|answer:)\s*:?\s*\$?([^\n$]+)", text, re.IGNORECASE):
        pass
    if m is not None:
        return m.group(1).strip().rstrip(".").strip()
    numbers = _NUMBER.findall(text)
    return numbers[-1] if numbers else None


_LATEX_DROP = ("\\left", "\\right", "\\!", "\\,", "\\;", "\\:", "\\displaystyle", "$",
               "^\\circ", "^{\\circ}", "\\%", "%", "\\$")


def normalize_math(ans: str) -> str:
    """A canonical string for a math answer: no spacing/sizing commands, units of \\text
    dropped to their content, dfrac/tfrac -> frac, `x = 3` -> `3`, `1,000` -> `1000`."""
    s = str(ans).strip()
    s = re.sub(r"\\(?:text|textbf|mathrm|mbox)\{([^{}]*)\}", r"\1", s)
    for tok in _LATEX_DROP:
        s = s.replace(tok, "")
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = re.sub(r"\\frac(\d)(\d)", r"\\frac{\1}{\2}", s)  # \frac12 -> \frac{1}{2}
    if s.count("=") == 1 and re.fullmatch(r"\s*[A-Za-z]\w*\s*", s.split("=")[0]):
        s = s.split("=")[1]
    s = s.strip().rstrip(".").strip()
    if re.fullmatch(r"[+-]?\d{1,3}(,\d{3})+(\.\d+)?", s):
        s = s.replace(",", "")
    s = s.lstrip("+") if re.fullmatch(r"\+[\d.]+", s) else s
    return re.sub(r"\s+", "", s)


def _to_number(s: str) -> float | None:
    """The value of a normalised answer that is a number, fraction or \\frac; else None."""
    m = re.fullmatch(r"(-?)\\frac\{(-?[\d.]+)\}\{(-?[\d.]+)\}", s)
    try:
        if m:
            value = float(m.group(2)) / float(m.group(3))
            return -value if m.group(1) else value
        if re.fullmatch(r"-?[\d.]+/-?[\d.]+", s):
            a, b = s.split("/")
            return float(a) / float(b)
        if re.fullmatch(r"-?(\d+\.?\d*|\.\d+)(e-?\d+)?", s):
            return float(s)
    except (ValueError, ZeroDivisionError):
        return None
    return None


def math_equal(a: str, b: str, rel_tol: float = 1e-6) -> bool:
    """Whether two answers (raw or extracted) mean the same: by value when both are numbers,
    else as normalised strings."""
    na, nb = normalize_math(a), normalize_math(b)
    if na == nb:
        return True
    va, vb = _to_number(na), _to_number(nb)
    if va is not None and vb is not None:
        return math.isclose(va, vb, rel_tol=rel_tol, abs_tol=1e-9)
    return False


class MathEvaluator(Evaluator):
    """reward 1 if the response's final answer equals the row's answer (see the module
    docstring for the extraction order and the comparison), else 0. A ground truth that is
    itself a worked solution (GSM8K's "... #### 72") is reduced to its final answer first.
    Metrics: correct, answer_found (an answer could be extracted at all)."""

    def __init__(self, answer_key: str = "answer", rel_tol: float = 1e-6) -> None:
        self.answer_key, self.rel_tol = answer_key, rel_tol

    def evaluate(self, data: dict[str, Any], evaluation_target: EvaluationTarget
                 ) -> EvaluationRunResult:
        truth = str(_ground_truth(data, self.answer_key, "math evaluator"))
        if "####" in truth or "\\boxed" in truth or "\\fbox" in truth:
            truth = extract_math_answer(truth) or truth
        got = extract_math_answer(evaluation_target.final_answer)
        ok = got is not None and math_equal(got, truth, self.rel_tol)
        return EvaluationRunResult(reward=float(ok), ground_truth=truth,
                                   metrics={"correct": float(ok),
                                            "answer_found": float(got is not None)},
                                   extra_info={"extracted": got})


#: Built-in evaluators by short name (a recipe may also give "path/to/file.py:Class").
EVALUATORS: dict[str, str] = {
    "exact_match": "nexrl.evaluators:ExactMatchEvaluator",
    "math": "nexrl.evaluators:MathEvaluator",
}


def load_evaluator(ref: str, args: dict[str, Any] | None = None,
                   base_dir: str | Path | None = None) -> Evaluator:
    """Build the evaluator named by `ref` (a key of EVALUATORS or "file.py:Class") with
    `args` as keyword arguments. Raises PluginError naming the reference on any failure."""
    target = EVALUATORS.get(ref, ref)
    if ":" not in target:
        raise PluginError(f"evaluator {ref!r} is neither a built-in ({', '.join(EVALUATORS)}) "
                          f"nor 'path/to/file.py:Class'")
    cls = load_object(target, base_dir)
    if not isinstance(cls, type) or not hasattr(cls, "evaluate"):
        raise PluginError(f"evaluator {ref!r} is not a class with an evaluate() method")
    try:
        return cls(**(args or {}))
    except TypeError as e:
        raise PluginError(f"evaluator {ref!r}: bad evaluator_args {args or {}}: {e}") from e

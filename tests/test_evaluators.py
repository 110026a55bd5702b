"""Evaluators: exact match, math answer extraction and comparison, plugin loading, charclass.

    python -m pytest tests/test_evaluators.py -q
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from nexrl.evaluators import (EVALUATORS, EvaluationRunResult, EvaluationTarget, Evaluator,
                              ExactMatchEvaluator, MathEvaluator, extract_math_answer,
                              last_boxed, load_evaluator, math_equal, normalize_math)
from nexrl.plugins import PluginError

ROOT = Path(__file__).resolve().parents[1]


def target(text: str) -> EvaluationTarget:
    return EvaluationTarget(final_answer=text)


def test_exact_match_whitespace_case_and_lists():
    ev = ExactMatchEvaluator()
    r = ev.evaluate({"answer": "Paris"}, target("  Paris \n"))
    assert (r.reward, r.metrics, r.ground_truth) == (1.0, {"correct": 1.0}, "Paris")
    assert ev.evaluate({"answer": "Paris"}, target("paris")).reward == 0.0
    assert ExactMatchEvaluator(case_sensitive=False).evaluate({"answer": "Paris"}, target("PARIS")).reward == 1.0
    assert ev.evaluate({"answer": "New  York"}, target("New York")).reward == 1.0
    assert ev.evaluate({"answer": ["a", "b"]}, target("b")).reward == 1.0
    assert ExactMatchEvaluator(answer_key="gold").evaluate({"gold": "x"}, target("x")).reward == 1.0
    with pytest.raises(KeyError, match="no 'answer' field"):
        ev.evaluate({"question": "q"}, target("x"))


@pytest.mark.parametrize("text, want", [
    ("so the result is \\boxed{42}.", "42"),
    ("\\boxed{\\frac{1}{2}} and later \\boxed{\\frac{3}{4}}", "\\frac{3}{4}"),   # the last one
    ("nested \\boxed{x^{2}+\\sqrt{y_{1}}}", "x^{2}+\\sqrt{y_{1}}"),
    ("\\fbox{7}", "7"),
    ("$\\boxed 5$", "5"),
    ("Natalia sold 48/2 = 24 clips.\n#### 72", "72"),
    ("#### 1,234\n", "1,234"),
    ("The answer is $-3.5$.", "-3.5"),
    ("Final answer: 12 apples", "12 apples"),
    ("first 3, then 4, finally 15", "15"),
    ("about .5 of it", ".5"),
    ("ratio 3/4", "3/4"),
    ("no numbers here", None),
])
def test_extract_math_answer(text, want):
    assert extract_math_answer(text) == want


def test_last_boxed_unbalanced_is_none():
    assert last_boxed("\\boxed{1 + (2") is None
    assert last_boxed("nothing") is None


@pytest.mark.parametrize("a, b, equal", [
    ("1,000", "1000", True),
    ("1000.0", "1000", True),
    ("\\frac{1}{2}", "0.5", True),
    ("\\dfrac{1}{2}", "1/2", True),
    ("\\frac12", "0.5", True),
    ("-\\frac{3}{4}", "-0.75", True),
    ("x = 5", "5", True),
    ("$5$", "5", True),
    ("50\\%", "50", True),
    ("10^\\circ", "10", True),
    ("\\text{3 cm}", "3cm", True),
    ("+7", "7", True),
    ("\\left( 1, 2 \\right)", "(1,2)", True),
    ("3", "4", False),
    ("\\frac{1}{3}", "0.33", False),
    ("\\sqrt{2}", "\\sqrt{3}", False),
    ("1/0", "1/0", True),          # same string, no division attempted
])
def test_math_equal(a, b, equal):
    assert math_equal(a, b) is equal


def test_normalize_math_is_canonical():
    assert normalize_math(" \\left(\\dfrac{1}{2}\\right). ") == "(\\frac{1}{2})"
    assert normalize_math("1,234,567") == "1234567"


def test_math_evaluator_formats_and_gsm8k_ground_truth():
    ev = MathEvaluator()
    gsm = {"answer": "She pays 3 * 24 = 72 dollars.\n#### 72"}
    r = ev.evaluate(gsm, target("Thus she pays \\boxed{72} dollars."))
    assert (r.reward, r.ground_truth, r.metrics) == (1.0, "72", {"correct": 1.0, "answer_found": 1.0})
    assert ev.evaluate(gsm, target("I think it is 71")).reward == 0.0
    assert ev.evaluate({"answer": "0.5"}, target("The answer is \\frac{1}{2}.")).reward == 1.0
    assert ev.evaluate({"answer": 1234}, target("#### 1,234")).reward == 1.0
    none = ev.evaluate({"answer": "3"}, target("I do not know"))
    assert none.reward == 0.0 and none.metrics["answer_found"] == 0.0


def test_registry_and_plugin_loading(tmp_path):
    assert set(EVALUATORS) == {"exact_match", "math"}
    assert isinstance(load_evaluator("math"), MathEvaluator)
    assert load_evaluator("exact_match", {"answer_key": "gold"}).answer_key == "gold"
    plugin = tmp_path / "my_eval.py"
    plugin.write_text(
        "from nexrl.evaluators import Evaluator, EvaluationRunResult\n"
        "class Len(Evaluator):\n"
        "    def __init__(self, scale=1.0):\n"
        "        self.scale = scale\n"
        "    def evaluate(self, data, t):\n"
        "        return EvaluationRunResult(reward=self.scale * len(t.final_answer))\n")
    ev = load_evaluator(f"{plugin}:Len", {"scale": 0.5})
    assert ev.evaluate({}, target("abcd")).reward == 2.0
    with pytest.raises(PluginError, match="neither a built-in"):
        load_evaluator("nonsense")
    with pytest.raises(PluginError, match="bad evaluator_args"):
        load_evaluator("math", {"no_such_arg": 1})
    with pytest.raises(PluginError, match="does not exist"):
        load_evaluator("missing.py:X")
    with pytest.raises(TypeError, match="takes no evaluator_args"):
        Evaluator(x=1)


def test_charclass_evaluator():
    ev = load_evaluator(f"{ROOT}/recipes/charclass/evaluator.py:CharClassEvaluator")
    row = {"answer": "digits", "length": 4}
    r = ev.evaluate(row, target("12a4xyz"))
    assert r.reward == 0.75 and r.metrics["correct"] == 0.0 and r.ground_truth == "digits"
    assert ev.evaluate(row, target("0987")).metrics == {"correct": 1.0, "in_class": 1.0,
                                                      "response_chars": 4.0}
    assert ev.evaluate(row, target("12")).reward == 0.5            # stopping early never pays
    assert ev.evaluate({"answer": "capitals", "length": 2}, target("AbC")).reward == 0.5
    assert ev.evaluate({"answer": "letters", "length": 2}, target("\ufffdz")).reward == 0.5
    with pytest.raises(ValueError, match="unknown class"):
        ev.evaluate({"answer": "emoji", "length": 2}, target("xx"))


def test_async_evaluators_are_supported_by_the_context():
    """An `async def evaluate` is awaited; a raising one gives reward 0 + evaluator_error."""
    from nexrl.rollout_workflow import RolloutContext

    class Async(Evaluator):
        async def evaluate(self, data, t):
            await asyncio.sleep(0)
            return EvaluationRunResult(reward=float(t.final_answer == data["answer"]))

    class Broken(Evaluator):
        def evaluate(self, data, t):
            raise RuntimeError("judge is down")

    class Slow(Evaluator):
        async def evaluate(self, data, t):
            await asyncio.sleep(5)

    errors = []

    def ctx(ev, timeout=5.0):
        return RolloutContext({"row": {"answer": "a"}, "item_id": "i"}, tokenizer=None,
                              engines=None, sampling=None, evaluator=ev,
                              evaluator_timeout_s=timeout, on_error=lambda c, m: errors.append((c, m)))

    async def go():
        ok = await ctx(Async()).evaluate("a")
        bad = await ctx(Broken()).evaluate("a")
        slow = await ctx(Slow(), timeout=0.05).evaluate("a")
        return ok, bad, slow

    ok, bad, slow = asyncio.run(go())
    assert ok.reward == 1.0
    assert (bad.reward, bad.metrics) == (0.0, {"evaluator_error": 1.0})
    assert (slow.reward, slow.metrics) == (0.0, {"evaluator_error": 1.0})
    assert [c for c, _ in errors] == ["evaluator_error", "evaluator_error"]
    assert "judge is down" in errors[0][1] and "timed out" in errors[1][1]

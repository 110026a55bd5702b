"""Rollout node against real processes: an embedded engine (tiny model), a dataloader, a pool
and a trajectory collector in the validator's place (tests/helpers/rollout_collector.py, so
the test can read every validation trajectory), all `nexrl-node` processes on a real event
proxy; this process plays the trainer (batch.request) and weight_sync (validation.start).

    python -m pytest tests/test_rollout.py -q

What is checked, against independent references (never against the rollout's own output):
prompt ids = the tokenizer's chat-template rendering; response logprobs = a plain HF forward
pass of the same checkpoint over prompt + response; multi-turn environment ids =
`tokenize_turn`'s framing recomputed here; rewards = the evaluator on the decoded response.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from helpers.data_procs import DataBus, NodeProc, wait_for
from helpers.procs import free_port
from nexrl.evaluators import EvaluationTarget, load_evaluator
from nexrl.rollout_engines import Sample
from nexrl.rollout_workflow import Episode, EvaluationRunResult, RolloutContext, to_wire
from nexrl.tiny import build_tiny_model

ROOT = Path(__file__).resolve().parents[1]
CHARCLASS = f"{ROOT}/recipes/charclass/evaluator.py:CharClassEvaluator"
TRY_AGAIN = f"{ROOT}/recipes/charclass/try_again.py:TryAgainWorkflow"
COLLECTOR = f"{ROOT}/tests/helpers/rollout_collector.py:Collector"


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return build_tiny_model(str(tmp_path_factory.mktemp("rollout") / "tiny"))


@pytest.fixture(scope="module")
def ref(model_path):
    tok = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path).eval()
    return model, tok


@pytest.fixture(scope="module")
def bus(tmp_path_factory):
    b = DataBus(tmp_path_factory.mktemp("rollout-bus"))
    try:
        yield b
    finally:
        b.close()


@pytest.fixture(scope="module")
def engine(bus, model_path) -> tuple[NodeProc, str]:
    url = f"http://127.0.0.1:{free_port()}"  # a fixed free port for the engine's HTTP server
    node = bus.start("inference", {"model_path": model_path, "num_threads": 1},
                     name="inference-0", node={"http_url": url}, wait_s=120)
    assert post(url, "/health", method="GET") == ""
    return node, url


def post(url: str, path: str, body: dict | None = None, method: str = "POST"):
    data = None if method == "GET" else json.dumps(body or {}).encode()
    req = urllib.request.Request(url + path, data=data, method=method,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        text = r.read().decode()
    return json.loads(text) if text.startswith("{") else text


def rows(tmp: Path, name: str, items: list[dict]) -> str:
    path = tmp / name
    path.write_text("".join(json.dumps(r) + "\n" for r in items))
    return str(path)


def charclass_row(tag: str, cls: str = "digits", **extra) -> dict:
    return {"prompt": [{"role": "user", "content": f"[{tag}] Write 4 {cls}."}], "answer": cls,
            "length": 4, "data_source": "charclass", **extra}


def start_job(bus: DataBus, engine, suffix: str, train: str, *, val: str | None = None,
              n: int = 4, val_n: int = 1, rollout: dict | None = None, engine_peer: bool = True,
              model_path: str = "", val_out: str = "", refuse_first: int = 0
              ) -> dict[str, NodeProc]:
    """dataloader-, pool-, validator-, rollout-<suffix>; the rollout finds the engine as its
    inference peer (engine_peer) or through rollout.engine_urls. The validator is the test
    collector (tests/helpers/rollout_collector.py), writing what it receives to val_out."""
    eng, url = engine
    dl = bus.start("dataloader", {"train_files": [train], "val_files": [val] if val else [],
                                  "n_samples": n, "val_n_samples": val_n, "shuffle": False,
                                  "admission_control": False}, name=f"dataloader-{suffix}")
    pool = bus.start("pool", {}, name=f"pool-{suffix}")
    nodes = {"dataloader": dl, "pool": pool}
    peers = {f"dataloader-{suffix}": dl, f"pool-{suffix}": pool}
    if val:
        nodes["validator"] = peers[f"validator-{suffix}"] = start_collector(
            bus, f"validator-{suffix}", val_out, refuse_first=refuse_first)
    node_extra = {}
    if engine_peer:
        peers["inference-0"] = eng
        node_extra["peers.inference-0.url"] = url
    cfg = {"model_path": model_path, "evaluator": CHARCLASS, "max_tokens": 6,
           "max_inflight_groups": 4, "lease_wait_s": 0.5, "metrics_every_groups": 1,
           "retry_backoff_s": 0.1, "max_backoff_s": 0.5, **(rollout or {})}
    nodes["rollout"] = bus.start("rollout", cfg, name=f"rollout-{suffix}", peers=peers,
                                 node=node_extra, wait_s=60)
    return nodes


def start_collector(bus: DataBus, name: str, out_path: str, refuse_first: int = 0) -> NodeProc:
    """The test collector as a `nexrl-node` process playing the validator."""
    recipe = bus.tmp / f"{name}.yaml"
    recipe.write_text(json.dumps({"validator": {"out_path": out_path, "refuse_first": refuse_first}}))
    log_path = bus.tmp / f"{name}.log"
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "nexrl.cli.node", COLLECTOR, "--name", name, "--config",
             str(recipe), "node.start=now", "node.endpoint=tcp://127.0.0.1:0",
             f"node.bus.events_pub={bus.pub_ep}", f"node.bus.events_sub={bus.sub_ep}",
             "node.bus.heartbeat_interval_s=0.2", "node.drain_timeout_s=5"],
            stdout=log, stderr=subprocess.STDOUT)
    bus.procs.append(proc)   # bus.close() kills it whatever happens
    endpoint = bus._wait_running(name, proc, log_path, 30.0)
    node = NodeProc(name, proc, log_path, endpoint, bus.client(endpoint))
    bus.nodes.append(node)
    return node


def collected(path: str, count: int, timeout: float = 60.0) -> list[dict]:
    """The first `count` trajectories the collector wrote (arrays back as numpy)."""
    deadline = time.monotonic() + timeout
    while True:
        lines = Path(path).read_text().splitlines() if Path(path).exists() else []
        if len(lines) >= count or time.monotonic() > deadline:
            assert len(lines) >= count, f"collector got {len(lines)} trajectories, want {count}"
            break
        time.sleep(0.1)
    out = []
    for line in lines:
        t = json.loads(line)
        out.append({k: np.asarray(v["data"], dtype=v["dtype"])
                    if isinstance(v, dict) and "dtype" in v else v for k, v in t.items()})
    return out


def take_batch(pool: NodeProc, groups: int, timeout: float = 60.0) -> list[dict]:
    body = pool.client.request("batch.request", {"num_groups": groups, "wait_s": timeout},
                               timeout=timeout + 10).body
    assert body["num_groups"] == groups, body
    return body["trajectories"]


def wait_status(node: NodeProc, key: str, value, timeout: float = 20.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        stats = node.status()
        if stats.get(key) == value or time.monotonic() > deadline:
            assert stats.get(key) == value, f"{node.name}: {key}={stats.get(key)}, want {value}"
            return stats
        time.sleep(0.1)


def hf_logprobs(model, ids: list[int]) -> np.ndarray:
    """lp[t] = log p(ids[t] | ids[:t]) under a plain forward pass (lp[0] = 0)."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float()
    lp = torch.log_softmax(logits, -1)[:-1].gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]
    return np.concatenate([[0.0], lp.numpy()])


def check_tokens_and_logprobs(t: dict, ref) -> None:
    model, _ = ref
    p, r = t["prompt_ids"].tolist(), t["response_ids"].tolist()
    mask, lps = t["response_mask"], t["response_logprobs"]
    assert t["prompt_ids"].dtype == np.int32 and t["response_ids"].dtype == np.int32
    assert mask.dtype == np.uint8 and lps.dtype == np.float32
    assert len(r) == len(mask) == len(lps) >= 1
    want = hf_logprobs(model, p + r)[len(p):]
    np.testing.assert_allclose(lps[mask == 1], want[mask == 1], atol=2e-3)
    assert np.all(lps[mask == 0] == 0.0)


# ----------------------------------------------------------------------------- tests
def test_train_and_validation_groups_end_to_end(bus, engine, model_path, ref, tmp_path):
    _, tok = ref
    train_rows = [charclass_row("abcd"), charclass_row("efgh", "letters"),
                  charclass_row("ijkl", "capitals")]
    val_rows = [charclass_row("mnop"), charclass_row("qrst", "letters")]
    events = bus.subscriber(("metrics",))
    val_out = str(tmp_path / "val.out.jsonl")
    nodes = start_job(bus, engine, "e2e", rows(tmp_path, "train.jsonl", train_rows),
                      val=rows(tmp_path, "val.jsonl", val_rows), n=4, val_n=2,
                      model_path=model_path, val_out=val_out, refuse_first=2)
    dl, pool, validator = nodes["dataloader"], nodes["pool"], nodes["validator"]
    # play weight_sync: a validation pass of version 0 (validation items are leased first)
    assert dl.client.request("validation.start", {"version": 0, "validation_id": "v0"}).body == \
        {"num_items": 2, "num_samples": 4}
    trajs = take_batch(pool, 3)
    assert len(trajs) == 12
    evaluator = load_evaluator(CHARCLASS)
    by_item = {f"train/e0/{i}": r for i, r in enumerate(train_rows)}
    for t in trajs:
        row = by_item[t["item_id"]]
        assert t["group_id"] == t["item_id"] and t["traj_id"] == f"{t['group_id']}/{t['sample_index']}"
        assert t["mode"] == "train" and t["group_size"] == 4 and t["worker"] == "rollout-e2e"
        assert t["data_source"] == "charclass" and "validation_id" not in t
        text = tok.apply_chat_template(row["prompt"], add_generation_prompt=True, tokenize=False)
        assert t["prompt_ids"].tolist() == tok.encode(text, add_special_tokens=False)
        assert 1 <= len(t["response_ids"]) <= 6 and np.all(t["response_mask"] == 1)
        check_tokens_and_logprobs(t, ref)
        assert t["weight_version"] == t["weight_version_max"] == 0
        decoded = tok.decode(t["response_ids"].tolist(), skip_special_tokens=True)
        want = evaluator.evaluate(row, EvaluationTarget(final_answer=decoded))
        assert t["reward"] == pytest.approx(want.reward)
        assert t["metrics"]["correct"] == want.metrics["correct"]
        assert t["finish_reason"] in ("stop", "length")
        assert t["timing"]["generate_s"] > 0 and t["timing"]["reward_s"] >= 0
    assert sorted(t["sample_index"] for t in trajs if t["group_id"] == "train/e0/0") == [0, 1, 2, 3]
    vals = collected(val_out, 4)
    assert validator.status()["refused"] == 2                # busy twice, then delivered
    assert sorted(t["traj_id"] for t in vals) == [f"val/v0/{i}/{k}" for i in range(2) for k in range(2)]
    for t in vals:
        row = val_rows[int(t["item_id"].split("/")[-1])]
        assert t["mode"] == "validate" and t["validation_id"] == "v0" and t["group_size"] == 2
        check_tokens_and_logprobs(t, ref)
        decoded = tok.decode(t["response_ids"].tolist(), skip_special_tokens=True)
        assert t["reward"] == pytest.approx(
            evaluator.evaluate(row, EvaluationTarget(final_answer=decoded)).reward)
    stats = wait_status(dl, "dataloader/acked", 5)          # 3 train + 2 validation groups
    assert stats["dataloader/expired"] == 0
    left = dl.client.request("lease.request", {"credits": 5}).body
    assert left == {"leases": [], "exhausted": True}        # nothing outstanding or left
    metrics = wait_for(events, "metrics", 20, lambda b: b["kind"] == "rollout")
    assert metrics is not None and metrics.body["values"]["rollout/groups"] >= 1
    assert metrics.body["values"]["rollout/tokens_per_s"] > 0
    rstats = nodes["rollout"].status()
    assert rstats["torch_imported"] is False        # a rollout worker never needs torch
    assert rstats["groups"] == 5 and rstats["trajectories"] == 16 and rstats["failed_items"] == 0


def test_engine_failures_and_aborted_requests_are_retried(bus, engine, model_path, ref, tmp_path):
    """A dead engine URL (connection refused) and requests aborted by pause(mode=abort) are
    retried until every sample has a real completion."""
    _, url = engine
    dead = "http://127.0.0.1:9"  # discard port: nothing listens
    post(url, "/pause_generation", {"mode": "retract"})      # requests queue, nothing runs
    try:
        train = rows(tmp_path, "t.jsonl", [charclass_row("aaaa"), charclass_row("bbbb")])
        nodes = start_job(bus, engine, "retry", train, n=3, engine_peer=False,
                          model_path=model_path,
                          rollout={"engine_urls": [dead, url + "/v1"], "engine_wait_s": 1.0})
        deadline = time.monotonic() + 30
        while post(url, "/get_server_info", method="GET")["waiting"] < 6:
            assert time.monotonic() < deadline, "rollout requests never reached the engine"
            time.sleep(0.1)
        time.sleep(0.6)  # past max_backoff_s: the dead URL (marked down at start) is tried again
        post(url, "/pause_generation", {"mode": "abort"})   # every queued sample comes back aborted
        deadline = time.monotonic() + 30
        while nodes["rollout"].status().get("engine_aborts", 0) < 6:
            assert time.monotonic() < deadline, nodes["rollout"].log()
            time.sleep(0.1)
    finally:
        post(url, "/continue_generation")
    trajs = take_batch(nodes["pool"], 2)
    assert len(trajs) == 6 and all(t["finish_reason"] in ("stop", "length") for t in trajs)
    for t in trajs:
        check_tokens_and_logprobs(t, ref)
    stats = nodes["rollout"].status()
    assert stats["engine_aborts"] >= 6 and stats["failed_items"] == 0 and stats["unacked"] == 0
    assert stats["engine_retries"] >= 1, "the dead engine URL was never tried"
    wait_status(nodes["dataloader"], "dataloader/acked", 2)


def test_refused_prompts_and_failing_evaluators(bus, engine, model_path, tmp_path):
    """An engine 400 (prompt past the context) refunds the group and acks it; an evaluator
    that raises gives reward 0 + evaluator_error; the node keeps working."""
    plugin = tmp_path / "boom_eval.py"
    plugin.write_text(
        "from nexrl.evaluators import Evaluator, EvaluationRunResult\n"
        "class Boom(Evaluator):\n"
        "    def evaluate(self, data, t):\n"
        "        if data.get('boom'):\n"
        "            raise RuntimeError('boom row')\n"
        "        return EvaluationRunResult(reward=1.0, metrics={'correct': 1.0})\n")
    events = bus.subscriber(("node.error",))
    train = rows(tmp_path, "t.jsonl", [
        charclass_row("good"), charclass_row("long" + "x" * 700), charclass_row("bad!", boom=True)])
    val = rows(tmp_path, "v.jsonl", [charclass_row("long" + "y" * 700)])
    val_out = str(tmp_path / "val.out.jsonl")
    nodes = start_job(bus, engine, "fail", train, val=val, val_n=2, n=2, model_path=model_path,
                      val_out=val_out, rollout={"evaluator": f"{plugin}:Boom"})
    nodes["dataloader"].client.request("validation.start", {"version": 0, "validation_id": "vf"})
    placeholders = collected(val_out, 2)             # the pass completes with reward-0 samples
    assert sorted(t["traj_id"] for t in placeholders) == ["val/vf/0/0", "val/vf/0/1"]
    assert all(t["reward"] == 0.0 and t["finish_reason"] == "error" and t["metrics"]["error"] == 1.0
               and t["validation_id"] == "vf" and len(t["response_ids"]) == 0 for t in placeholders)
    trajs = take_batch(nodes["pool"], 2)
    by_group = {}
    for t in trajs:
        by_group.setdefault(t["group_id"], []).append(t)
    assert sorted(by_group) == ["train/e0/0", "train/e0/2"]
    assert all(t["reward"] == 1.0 for t in by_group["train/e0/0"])
    assert all(t["reward"] == 0.0 and t["metrics"] == {"evaluator_error": 1.0}
               for t in by_group["train/e0/2"])
    stats = wait_status(nodes["dataloader"], "dataloader/acked", 4)
    assert stats["dataloader/refunded"] == 1             # the training group, not the validation one
    codes = set()
    deadline = time.monotonic() + 10
    while {"item_failed", "evaluator_error"} - codes and time.monotonic() < deadline:
        got = wait_for(events, "node.error", 1.0, lambda b: b["node"] == "rollout-fail")
        if got is not None:
            codes.add(got.body["code"])
    assert {"item_failed", "evaluator_error"} <= codes
    assert nodes["rollout"].status()["failed_items"] == 2


def test_multi_turn_workflow_token_bookkeeping(bus, engine, model_path, ref, tmp_path):
    """The recipe's try-again workflow: answer 1 (mask 1) + feedback turn (mask 0) + answer 2
    (mask 1); answer 2 was generated from exactly prompt + answer 1 + feedback ids."""
    _, tok = ref
    train_rows = [charclass_row("wxyz"), charclass_row("zyxw", "capitals")]
    nodes = start_job(bus, engine, "multi", rows(tmp_path, "t.jsonl", train_rows), n=2,
                      model_path=model_path,
                      rollout={"rollout_class": TRY_AGAIN,
                               "rollout_args": {"max_turns": 2, "stop_reward": 2.0}})
    trajs = take_batch(nodes["pool"], 2)
    ctx = RolloutContext({}, tokenizer=tok, engines=None, sampling=None, evaluator=None,
                         evaluator_timeout_s=1.0)
    for t in trajs:
        mask = t["response_mask"].tolist()
        first = mask.index(0)
        second = mask.index(1, first)
        assert mask == [1] * first + [0] * (second - first) + [1] * (len(mask) - second)
        resp = t["response_ids"].tolist()
        row = train_rows[int(t["item_id"].split("/")[-1])]
        feedback = [{"role": "user", "content": f"Try again: write 4 {row['answer']}."}]
        assert resp[first:second] == ctx.tokenize_turn(feedback, after=resp[:first])
        check_tokens_and_logprobs(t, ref)      # turn 2 logprobs hold on the full context
        assert t["metrics"]["turns"] == 2.0
        text = tok.decode(resp[second:], skip_special_tokens=True)   # the reward is answer 2's
        want = load_evaluator(CHARCLASS).evaluate(row, EvaluationTarget(final_answer=text))
        assert t["reward"] == pytest.approx(want.reward)


def test_episode_and_tokenize_turn_units(ref):
    """Episode concatenation and masks; tokenize_turn closes the assistant turn whether or not
    the model emitted the stop token itself."""
    _, tok = ref
    ctx = RolloutContext({"prompt": [{"role": "user", "content": "hi"}]}, tokenizer=tok,
                         engines=None, sampling=None, evaluator=None, evaluator_timeout_s=1.0,
                         system_prompt="be brief")
    prompt = ctx.prompt_ids()
    assert tok.decode(prompt) == ("<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nhi"
                                  "<|im_end|>\n<|im_start|>assistant\n")
    assert ctx.prompt_ids("raw text") == tok.encode("raw text")
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    msg = [{"role": "user", "content": "again"}]
    stopped = ctx.tokenize_turn(msg, after=tok.encode("ok") + [im_end])
    truncated = ctx.tokenize_turn(msg, after=tok.encode("ok"))
    assert tok.decode(stopped) == "\n<|im_start|>user\nagain<|im_end|>\n<|im_start|>assistant\n"
    assert tok.decode(truncated) == "<|im_end|>" + tok.decode(stopped)
    ep = Episode(prompt)
    a = Sample([5, 6, im_end], [-1.0, -2.0, -0.5], "stop", 3, 3)
    b = Sample([7], [-0.25], "length", 4, 5)
    ep.add_model(a).add_env(stopped).add_model(b)
    assert ep.context_ids() == prompt + [5, 6, im_end] + stopped + [7]
    assert ep.response_mask == [1, 1, 1] + [0] * len(stopped) + [1]
    assert ep.response_logprobs == [-1.0, -2.0, -0.5] + [0.0] * len(stopped) + [-0.25]
    t = ep.to_trajectory(EvaluationRunResult(reward=0.5, metrics={"correct": 0.0}))
    assert (t.weight_version, t.weight_version_max, t.finish_reason) == (3, 5, "length")
    assert t.reward == 0.5 and t.prompt_ids == prompt and len(t.response_ids) == len(t.response_mask)
    with pytest.raises(ValueError, match="no model turn"):
        Episode(prompt).to_trajectory(EvaluationRunResult(reward=0.0))
    task = {"item_id": "i", "group_id": "g", "mode": "train", "n": 1, "data_source": "d"}
    (w,) = to_wire(task, [t], "rollout-x")
    assert w["traj_id"] == "g/0" and w["group_size"] == 1 and w["response_mask"].dtype == np.uint8
    assert w["response_logprobs"].dtype == np.float32 and w["prompt_ids"].dtype == np.int32
    with pytest.raises(ValueError, match="2 trajectories for a task of n=1"):
        to_wire(task, [t, t], "rollout-x")
    t.response_mask = t.response_mask[:-1]
    with pytest.raises(ValueError, match="one length"):
        to_wire(task, [t], "rollout-x")


def test_parse_choice_takes_sglangs_response_level_weight_version():
    """sglang puts weight_version in the response's metadata, not in each choice."""
    from nexrl.rollout_engines import EngineReplyError, parse_choice

    choice = {"token_ids": [5, 6], "logprobs": {"token_logprobs": [-0.5, -1.5]},
              "finish_reason": "stop"}
    s = parse_choice(choice, "http://sglang:30000", "7")
    assert (s.weight_version, s.weight_version_max, s.logprobs) == (7, 7, [-0.5, -1.5])
    with pytest.raises(EngineReplyError, match="weight_version None"):
        parse_choice(choice, "http://sglang:30000")

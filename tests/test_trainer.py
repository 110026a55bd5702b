"""Trainer: packing, micro-batch accumulation, lr schedules, checkpoints (round trip, a save
killed half way), SFT; then the trainer node end to end against real peers, and resume.

Run: ``python -m pytest tests/test_trainer.py -q`` (CPU, ~60 s on 2 cores).

End to end: an event proxy in the test process; an embedded engine (inference node, tiny
Qwen2), the weight_sync node, the pool and the trainer run as `nexrl-node` subprocesses. The
test plays the rollout worker: it samples groups from the real engine (token ids, engine
logprobs, versions) and delivers them to the pool with trajectory.put, so the trainer's
step-0 logprobs can be compared with the engine's on the same tokens.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from helpers.trainer_cluster import (Bus, Cluster, make_trajectories, put_trajectories,
                                     wait_running)
from nexrl import checkpoint as ckpt
from nexrl.algorithms import AlgorithmConfig, token_logprobs
from nexrl.engine_client import EngineClient
from nexrl.nodes.trainer import REQUIRED_METRICS
from nexrl.sft_data import SFTConfig, SFTStream, load_sft_samples
from nexrl.tiny import build_tiny_model
from nexrl.train_steps import GRPOUpdate, SFTUpdate, StepContext, policy_backward
from nexrl.trainer_utils import (Sample, build_optimizer, lr_factor, pack, response_logits,
                                 sequence_logprobs)

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_model(str(tmp_path_factory.mktemp("tiny") / "m"))


def _model(path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def _samples(n=6, seed=0):
    g = np.random.default_rng(seed)
    out = []
    for i in range(n):
        p, r = int(g.integers(1, 6)), int(g.integers(0, 7))
        mask = [float(x) for x in g.integers(0, 2, r)] if i % 3 == 2 else [1.0] * r
        out.append(Sample([int(x) for x in g.integers(3, 250, p)],
                          [int(x) for x in g.integers(3, 250, r)], mask,
                          [float(x) for x in -g.random(r)]))
    return out


def _opt(model, lr=1e-3, **kw):
    a = dict(lr=lr, weight_decay=0.0, betas=[0.9, 0.999], eps=1e-8, schedule="constant",
             warmup_steps=0, total_steps=10, min_lr_ratio=0.0)
    a.update(kw)
    return build_optimizer(model, **a)


# ----------------------------------------------------------------------------- packing
def test_pack_right_pads_and_scores_response_positions(tiny):
    model = _model(tiny).eval()
    samples = _samples()
    p = pack(samples, pad_id=0)
    L = max(s.num_tokens for s in samples)
    T = max(len(s.response_ids) for s in samples)
    assert p.input_ids.shape == (len(samples), L) and p.response_ids.shape == (len(samples), T)
    for i, s in enumerate(samples):
        n = s.num_tokens
        assert p.input_ids[i, :n].tolist() == s.prompt_ids + s.response_ids
        assert p.attention_mask[i].tolist() == [1] * n + [0] * (L - n)
        assert p.mask[i].tolist() == s.response_mask + [0.0] * (T - len(s.response_ids))
        assert p.engine_logp[i, :len(s.response_ids)].tolist() == pytest.approx(s.engine_logprobs)
    with torch.no_grad():
        batched = token_logprobs(response_logits(model, p), p.response_ids)
        for i, s in enumerate(samples):  # each sequence alone, no padding at all
            if not s.response_ids:
                continue
            ids = torch.tensor([s.prompt_ids + s.response_ids])
            logits = model(input_ids=ids).logits[0, len(s.prompt_ids) - 1:-1]
            alone = token_logprobs(logits, torch.tensor(s.response_ids))
            torch.testing.assert_close(batched[i, :len(s.response_ids)], alone, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="empty prompt"):
        Sample([], [1], [1.0])


@pytest.mark.parametrize("algo", [
    dict(loss_agg="token-mean"),
    dict(loss_agg="seq-mean-token-mean", kl_coef=0.05, entropy_coef=0.01, tis_cap=2.0),
    dict(loss_agg="seq-mean-token-sum-norm", loss_agg_norm_len=8, advantage="drgrpo",
         dual_clip_c=3.0, kl_coef=0.05, kl_estimator="k2"),
])
def test_micro_batches_accumulate_the_full_batch_gradient(tiny, algo):
    model, ref = _model(tiny), _model(tiny).eval()
    with torch.no_grad():  # make the reference differ so the KL term has a gradient
        for q in ref.parameters():
            q.add_(0.01 * torch.randn_like(q))
    samples = _samples(7, seed=1)
    cfg = AlgorithmConfig(**algo)
    adv = torch.linspace(-1, 1, len(samples))
    ref_lp = sequence_logprobs(ref, samples, pad_id=0, device="cpu", micro_batch_size=3)
    # old logprobs from slightly different weights, so ratios (and clipping) are not trivial
    old_lp = [x + 0.05 * torch.randn_like(x) for x in
              sequence_logprobs(model, samples, pad_id=0, device="cpu", micro_batch_size=7)]
    grads, metrics = [], []
    for mbs in (len(samples), 3, 1):
        opt, sched = _opt(model)
        ctx = StepContext(model=model, optimizer=opt, scheduler=sched, pad_id=0,
                          micro_batch_size=mbs, algorithm=cfg)
        model.zero_grad(set_to_none=True)
        metrics.append(policy_backward(ctx, samples, adv, old_lp, ref_lp))
        grads.append(torch.cat([q.grad.flatten() for q in model.parameters()]))
    assert grads[0].abs().max() > 0
    for g in grads[1:]:
        torch.testing.assert_close(g, grads[0], atol=1e-6, rtol=1e-4)
    for m in metrics[1:]:
        assert m["loss"] == pytest.approx(metrics[0]["loss"], abs=1e-5)
        assert m["num_tokens"] == metrics[0]["num_tokens"]
        assert m["clip_frac"] == pytest.approx(metrics[0]["clip_frac"], abs=1e-6)


def test_lr_schedules():
    kw = dict(warmup_steps=2, total_steps=12, min_lr_ratio=0.1)
    assert [lr_factor(s, schedule="constant", **kw) for s in (0, 1, 2, 11)] == [0.5, 1, 1, 1]
    cos = [lr_factor(s, schedule="cosine", **kw) for s in (0, 1, 2, 7, 12, 20)]
    assert cos == pytest.approx([0.5, 1.0, 1.0, 0.55, 0.1, 0.1])
    lin = [lr_factor(s, schedule="linear", **kw) for s in (2, 7, 12)]
    assert lin == pytest.approx([1.0, 0.55, 0.1])
    model = torch.nn.Linear(2, 2)
    opt, sched = build_optimizer(model, lr=2.0, weight_decay=0.1, betas=[0.9, 0.99], eps=1e-8,
                                 schedule="linear", **kw)
    seen = []
    for _ in range(4):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == pytest.approx([1.0, 2.0, 2.0, 2.0 * (0.1 + 0.9 * 0.9)])
    with pytest.raises(ValueError, match="lr_schedule"):
        lr_factor(0, schedule="step", **kw)


# ----------------------------------------------------------------------------- checkpoints
def test_checkpoint_round_trip(tiny, tmp_path):
    model, tok = _model(tiny), AutoTokenizer.from_pretrained(tiny)
    opt, sched = _opt(model, schedule="cosine")
    ctx = StepContext(model=model, optimizer=opt, scheduler=sched, pad_id=0,
                      micro_batch_size=4, algorithm=None)
    SFTUpdate(ctx).step(_samples(4))
    state = {"step": 3, "version": 3, "rng": ckpt.rng_state(), "consumed": ["a", "b"]}
    expect_rand = torch.rand(3)
    data = {"dataloader": {"epoch": np.int64(2), "perm": np.arange(4)}, "pool": None,
            "consumed": ["a", "b"]}
    path = ckpt.save_checkpoint(str(tmp_path), 3, model=model, tokenizer=tok, optimizer=opt,
                                scheduler=sched, trainer_state=state, data_state=data)
    assert os.path.basename(path) == "step_3" and ckpt.latest_checkpoint(str(tmp_path)) == path
    assert ckpt.read_data_state(path) == {"dataloader": {"epoch": 2, "perm": [0, 1, 2, 3]},
                                          "pool": None, "consumed": ["a", "b"]}
    torch.rand(5)  # move the RNG on
    loaded = _model(path)
    opt2, sched2 = _opt(loaded, schedule="cosine")
    ckpt.load_optimizer(path, opt2, sched2)
    st = ckpt.read_trainer_state(path)
    ckpt.set_rng_state(st["rng"])
    assert st["step"] == 3 and st["consumed"] == ["a", "b"]
    torch.testing.assert_close(torch.rand(3), expect_rand)
    for (n, a), (_, b) in zip(model.named_parameters(), loaded.named_parameters(), strict=True):
        torch.testing.assert_close(a, b, msg=n)
    s1, s2 = opt.state_dict(), opt2.state_dict()
    for k in s1["state"]:
        torch.testing.assert_close(s1["state"][k]["exp_avg"], s2["state"][k]["exp_avg"])
    assert sched2.state_dict()["last_epoch"] == sched.state_dict()["last_epoch"] == 1
    with pytest.raises(ckpt.CheckpointError, match="JSON cannot hold"):
        ckpt.save_checkpoint(str(tmp_path), 4, model=model, tokenizer=tok, optimizer=opt,
                             scheduler=sched, trainer_state=state, data_state={"x": object()})
    assert ckpt.latest_checkpoint(str(tmp_path)) == path  # the failed save left nothing


KILLED_SAVE = r"""
import sys, time, torch
from transformers import AutoModelForCausalLM
from nexrl import checkpoint as ckpt
from nexrl.trainer_utils import build_optimizer
root, model_path = sys.argv[1], sys.argv[2]
m = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
opt, sched = build_optimizer(m, lr=1e-3, weight_decay=0.0, betas=[0.9, 0.999], eps=1e-8,
                             schedule="constant", warmup_steps=0, total_steps=1, min_lr_ratio=0.0)
args = dict(model=m, tokenizer=None, optimizer=opt, scheduler=sched, data_state={}, keep=2)
ckpt.save_checkpoint(root, 1, trainer_state={"step": 1, "rng": ckpt.rng_state()}, **args)
real = m.save_pretrained
def slow_save(d, **kw):   # weights land in the temp dir, then the process is killed
    real(d, **kw)
    print("SAVING", flush=True)
    time.sleep(60)
m.save_pretrained = slow_save
ckpt.save_checkpoint(root, 2, trainer_state={"step": 2, "rng": ckpt.rng_state()}, **args)
"""


def test_checkpoint_killed_mid_save_is_ignored(tiny, tmp_path):
    root = tmp_path / "ckpts"
    proc = subprocess.Popen([sys.executable, "-c", KILLED_SAVE, str(root), tiny],
                            stdout=subprocess.PIPE, text=True)
    try:
        line = ""
        deadline = time.monotonic() + 60
        while "SAVING" not in line and time.monotonic() < deadline:
            line = proc.stdout.readline()
            assert line or proc.poll() is None, "saver exited early"
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stdout.close()
    leftovers = [n for n in os.listdir(root) if n.startswith(".tmp-step_2")]
    assert leftovers, os.listdir(root)
    os.makedirs(root / "step_7")  # a copied-by-hand, incomplete directory
    assert ckpt.latest_checkpoint(str(root)) == str(root / "step_1")
    assert ckpt.read_trainer_state(str(root / "step_1"))["step"] == 1
    model = _model(tiny)
    opt, sched = _opt(model)
    for k in (3, 4, 5):  # the next saves clear the leftover and keep the newest 2
        ckpt.save_checkpoint(str(root), k, model=model, tokenizer=None, optimizer=opt,
                             scheduler=sched, trainer_state={"step": k}, data_state={}, keep=2)
    names = sorted(n for n in os.listdir(root) if not n.startswith("step_7"))
    assert names == ["step_4", "step_5"]


# ----------------------------------------------------------------------------- SFT
def test_sft_steps_reduce_cross_entropy_on_a_fixed_batch(tiny, tmp_path):
    tok = AutoTokenizer.from_pretrained(tiny)
    rows = [{"prompt": f"Q{i}: 2+{i}=", "response": str(2 + i)} for i in range(5)]
    rows.append({"messages": [{"role": "user", "content": "hi"},
                              {"role": "assistant", "content": "hello"}]})
    f = tmp_path / "sft.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in rows))
    samples = load_sft_samples(str(f), tok, SFTConfig(data_file=str(f)))
    assert samples[0].response_ids[-1] == tok.eos_token_id
    assert tok.decode(samples[-1].prompt_ids).endswith("<|im_start|>assistant\n")
    model = _model(tiny)
    opt, sched = _opt(model, lr=3e-3)
    upd = SFTUpdate(StepContext(model=model, optimizer=opt, scheduler=sched, pad_id=0,
                                micro_batch_size=4))
    losses = [upd.step(samples)["train/loss"] for _ in range(6)]
    assert losses[-1] < 0.8 * losses[0], losses
    stream = SFTStream(samples, batch_size=4, shuffle=True, seed=3)
    stream.next_batch()
    st = stream.state()
    expect = stream.next_batch()[1]
    again = SFTStream(samples, batch_size=4, shuffle=True, seed=3)
    again.restore(st)
    assert again.next_batch()[1] == expect
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x"}\n')
    with pytest.raises(ValueError, match="line 1"):
        load_sft_samples(str(bad), tok, SFTConfig(data_file=str(bad)))


def test_grpo_step_reports_the_required_train_metrics(tiny):
    model, ref = _model(tiny), _model(tiny).eval()
    opt, sched = _opt(model)
    ctx = StepContext(model=model, optimizer=opt, scheduler=sched, pad_id=0, micro_batch_size=3,
                      algorithm=AlgorithmConfig(kl_coef=0.05, kl_in="reward"), ref_model=ref,
                      ppo_epochs=2, mini_batches=2)
    trajs = [dict(prompt_ids=s.prompt_ids, response_ids=s.response_ids or [5],
                  response_mask=s.response_mask or [1.0],
                  response_logprobs=s.engine_logprobs or [-1.0], reward=float(i % 3),
                  group_id=f"g{i // 3}") for i, s in enumerate(_samples(6, seed=2))]
    before = [q.detach().clone() for q in model.parameters()]
    out = GRPOUpdate(ctx).step(trajs)
    need = {k for k in REQUIRED_METRICS if k.startswith("train/") and "staleness" not in k}
    assert need <= set(out)
    assert out["train/adv_mean"] == pytest.approx(0.0, abs=1e-6) and out["train/grad_norm"] > 0
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    assert sched.last_epoch == 1  # one scheduler step per trainer step (4 optimizer updates)


# ----------------------------------------------------------------------------- end to end
PROMPTS = [[20, 31, 42, 53], [60, 71, 82, 93, 104], [15, 26, 37], [48, 59, 70, 81]]


@pytest.fixture(scope="module")
def job(tmp_path_factory, tiny):
    root = tmp_path_factory.mktemp("job")
    bus = Bus()
    cl = Cluster(bus, root)
    try:
        url = cl.start_engine("inference-0", tiny)
        cl.add_peer("weight_sync", "weight_sync")
        cl.add_peer("pool", "pool")
        cl.add_peer("trainer", "trainer")
        cl.wait_healthy("inference-0")
        cl.spawn("weight_sync", "weight_sync", ["weight_sync.republish_s=1.0"],
                 peers=["inference-0"])
        bus.wait("weights.live", timeout=60, version=0)
        yield dict(bus=bus, cl=cl, url=url, root=root, tiny=tiny)
    finally:
        cl.close()
        bus.close()


def _trainer_args(tiny, **extra):
    args = {"model_path": tiny, "total_steps": 2, "batch_groups": 1, "micro_batch_size": 3,
            "save_every": 1, "batch_wait_s": 1.0, "num_threads": 1, "optim.lr": 0.01,
            "algorithm.kl_coef": 0.01, "algorithm.tis_cap": 2.0, "bucket_bytes": 1 << 16}
    args.update(extra)
    return [f"trainer.{k}={v}" for k, v in args.items()]


def _engine_logprobs(url, prompt, n=6):
    with EngineClient(url, timeout=60) as c:
        ch = c.complete(prompt, max_tokens=n, temperature=0.0, ignore_eos=True)["choices"][0]
    return ch["token_ids"], ch["token_logprobs"]


def _model_logprobs(path, prompt, ids):
    m = _model(path).eval()
    with torch.no_grad():
        logits = m(input_ids=torch.tensor([prompt + ids])).logits[0, len(prompt) - 1:-1]
        return token_logprobs(logits, torch.tensor(ids)).tolist()


@pytest.fixture(scope="module")
def first_run(job):
    """Two trainer steps fed by the real pool (nexrl.nodes.pool), to which the test delivers
    trajectories sampled from the real engine, as a rollout worker would."""
    bus, cl = job["bus"], job["cl"]
    trajs = make_trajectories(job["url"], PROMPTS[:2], n=4, max_tokens=6)
    cl.spawn("pool", "pool", ["pool.group_size=4"])
    wait_running(bus, cl.peers["pool"].endpoint)
    assert put_trajectories(bus, cl.peers["pool"].endpoint, trajs)["accepted"] == 8
    mark = bus.mark()
    cl.spawn("trainer", "trainer", _trainer_args(job["tiny"]),
             peers=["inference-0", "weight_sync", "pool"])
    code = cl.wait_exit("trainer", timeout=120)
    assert code == 0, cl.log("trainer")[-4000:]
    cl.kill("pool")
    return dict(mark=mark, trajs=trajs)


def test_trainer_steps_sync_and_checkpoint(job, first_run):
    bus, url, root = job["bus"], job["url"], job["root"]
    mark = first_run["mark"]
    m1 = bus.wait("metrics", since=mark, kind="train", step=1)
    m2 = bus.wait("metrics", since=mark, kind="train", step=2)
    for m in (m1, m2):
        missing = set(REQUIRED_METRICS) - set(m.body["values"])
        assert not missing, missing
    v1 = m1.body["values"]
    # step 0: trainer and engine hold the same weights -> same logprobs on the same tokens
    assert v1["train/logprob_mismatch"] < 5e-5, v1["train/logprob_mismatch"]
    assert v1["train/staleness_max"] == 0 and m2.body["values"]["train/staleness_max"] == 1
    assert v1["train/kl"] == pytest.approx(0.0, abs=1e-6)  # policy == reference at step 0
    assert m2.body["values"]["train/kl"] > 0
    assert v1["train/response_len_max"] == 6.0 and v1["timing/weight_sync_s"] > 0
    bus.wait("weights.live", since=mark, version=1)
    bus.wait("weights.live", since=mark, version=2)
    saved = [m.body for m in bus.of("checkpoint.saved")]
    assert [s["step"] for s in saved] == [1, 2]
    ck2 = root / "checkpoints" / "step_2"
    assert saved[1]["path"] == str(ck2)
    with EngineClient(url) as c:
        assert c.get_weight_version() == "2"
    # the engine now serves exactly the trainer's step-2 weights
    ids, eng = _engine_logprobs(url, PROMPTS[2])
    assert eng == pytest.approx(_model_logprobs(str(ck2), PROMPTS[2], ids), abs=1e-4)
    assert eng != pytest.approx(_model_logprobs(job["tiny"], PROMPTS[2], ids), abs=1e-4)
    st = ckpt.read_trainer_state(str(ck2))
    assert st["step"] == 2 and st["version"] == 2 and st["consumed"] == ["item-0", "item-1"]
    data = ckpt.read_data_state(str(ck2))
    assert data["dataloader"] is None  # no dataloader in this job
    assert data["pool"]["groups"] == [] and data["pool"]["counts"]["groups_released"] == 2
    assert data["consumed"] == ["item-0", "item-1"]
    for f in ("config.json", "model.safetensors", "tokenizer.json", "optimizer.pt"):
        assert (ck2 / f).exists(), f


def test_trainer_resumes_and_pushes_before_asking_for_batches(job, first_run):
    """Resume: the trainer pushes the checkpoint's weights (version 2) before it asks for a
    batch. The pool gets its group only once that sync is seen: a trainer that asked first
    would sit in batch.request and never push, and this test would time out."""
    bus, cl, url, root = job["bus"], job["cl"], job["url"], job["root"]
    with EngineClient(url) as c:  # engines back on the initial weights, as after a restart
        c.update_weights_from_disk(job["tiny"], weight_version="0")
    late_copy = make_trajectories(url, PROMPTS[1:2], n=4, max_tokens=6, first_group=1)
    fresh = make_trajectories(url, PROMPTS[2:3], n=4, max_tokens=6, first_group=2)
    mark = bus.mark()
    cl.spawn("pool", "pool", ["pool.group_size=4", "pool.resume_from=auto"])
    cl.spawn("trainer", "trainer", _trainer_args(job["tiny"], total_steps=3, resume="auto"),
             peers=["inference-0", "weight_sync", "pool"])
    # a real sync of version 2 (weights.live{2} is also re-published from the first run)
    bus.wait("metrics", since=mark, timeout=90, kind="sync", step=2)
    with EngineClient(url) as c:
        assert c.get_weight_version() == "2"
    pool = cl.peers["pool"].endpoint
    # item-1 was trained before the checkpoint: the resumed pool drops a late copy of it
    assert put_trajectories(bus, pool, late_copy) == {"accepted": 0, "duplicates": 4}
    assert put_trajectories(bus, pool, fresh)["accepted"] == 4
    assert cl.wait_exit("trainer", timeout=120) == 0, cl.log("trainer")[-4000:]
    m3 = bus.wait("metrics", since=mark, kind="train", step=3)
    assert m3.body["values"]["train/staleness_max"] == 2  # sampled from version 0
    steps = [m.body["step"] for m in bus.events[mark:]
             if m.type == "metrics" and m.body["kind"] == "train" and m.sender == "trainer"]
    assert steps == [3]
    st = ckpt.read_trainer_state(str(root / "checkpoints" / "step_3"))
    assert st["step"] == 3 and st["consumed"] == ["item-0", "item-1", "item-2"]
    with EngineClient(url) as c:
        assert c.get_weight_version() == "3"
    assert "resumed from" in cl.log("trainer")
    cl.kill("pool")


def test_sft_trainer_runs_standalone(job, tmp_path):
    bus, cl = job["bus"], job["cl"]
    f = tmp_path / "sft.jsonl"
    f.write_text("\n".join(json.dumps({"prompt": f"{i}+1=", "response": str(i + 1)})
                           for i in range(6)))
    cl.add_peer("sft", "trainer")
    mark = bus.mark()
    cl.spawn("trainer", "sft", ["trainer.type=sft", f"trainer.model_path={job['tiny']}",
                                f"trainer.sft.data_file={f}", "trainer.sft.batch_size=4",
                                "trainer.total_steps=3", "trainer.push_weights=false",
                                "trainer.optim.lr=0.003", "trainer.num_threads=1"],
             run_dir=tmp_path)
    assert cl.wait_exit("sft", timeout=90) == 0, cl.log("sft")[-3000:]
    losses = [bus.wait("metrics", since=mark, kind="train", step=k,
                       pred=lambda m: m.sender == "sft").body["values"]["train/loss"]
              for k in (1, 2, 3)]
    assert all(np.isfinite(losses))
    st = ckpt.read_trainer_state(str(tmp_path / "checkpoints" / "step_3"))
    assert st["extra"]["sft"] == {"epoch": 1, "pos": 6}  # 3 steps x 4 rows over 6 rows


def test_trainer_without_engines_fails_clearly(job, tmp_path):
    cl = job["cl"]
    cl.add_peer("lonely", "trainer")
    cl.spawn("trainer", "lonely", [f"trainer.model_path={job['tiny']}"], run_dir=tmp_path)
    assert cl.wait_exit("lonely", timeout=60) == 1
    log = cl.log("lonely")
    assert "no inference engine" in log and "push_weights=false" in log


# ----------------------------------------------------------------------------- GPU
@pytest.mark.gpu
def test_trainer_on_cuda_pushes_bf16_weights(tiny, tmp_path):
    """The CUDA path: fp32 master weights + bf16 autocast in the trainer, weights cast to bf16
    and pushed to a bf16 engine. With 2+ GPUs the engine gets its own GPU and the push goes
    over NCCL; on one GPU NCCL refuses two ranks on the same device ("Duplicate GPU
    detected"), so the colocated case uses sync_backend=gloo."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    two = torch.cuda.device_count() >= 2
    engine_dev, backend = ("cuda:1", "nccl") if two else ("cuda:0", "gloo")
    bus = Bus()
    cl = Cluster(bus, tmp_path)
    try:
        url = cl.start_engine("inference-0", tiny, [f"inference.device={engine_dev}"])
        for name, role in (("weight_sync", "weight_sync"), ("pool", "pool"),
                           ("trainer", "trainer")):
            cl.add_peer(name, role)
        cl.wait_healthy("inference-0", timeout=120)
        cl.spawn("weight_sync", "weight_sync", [], peers=["inference-0"])
        bus.wait("weights.live", timeout=60, version=0)
        trajs = make_trajectories(url, PROMPTS[:2], n=4, max_tokens=6)
        cl.spawn("pool", "pool", ["pool.group_size=4"])
        wait_running(bus, cl.peers["pool"].endpoint)
        assert put_trajectories(bus, cl.peers["pool"].endpoint, trajs)["accepted"] == 8
        cl.spawn("trainer", "trainer", _trainer_args(tiny, **{
            "device": "cuda:0", "sync_backend": backend, "algorithm.kl_in": "reward",
            "ppo_epochs": 2}), peers=["inference-0", "weight_sync", "pool"])
        assert cl.wait_exit("trainer", timeout=180) == 0, cl.log("trainer")[-4000:]
        assert f"backend {backend}" in cl.log("trainer")
        v1 = bus.wait("metrics", kind="train", step=1).body["values"]
        assert v1["train/logprob_mismatch"] < 0.05  # bf16 engine vs bf16-autocast trainer
        with EngineClient(url) as c:
            assert c.get_weight_version() == "2"
            assert c._call("GET", "/get_server_info")["dtype"] == "bfloat16"
        ck2 = str(tmp_path / "checkpoints" / "step_2")
        ids, eng = _engine_logprobs(url, PROMPTS[2])
        m = AutoModelForCausalLM.from_pretrained(ck2, dtype=torch.bfloat16).to(engine_dev).eval()
        with torch.no_grad():
            p = len(PROMPTS[2])
            x = torch.tensor([PROMPTS[2] + ids], device=engine_dev)
            mine = token_logprobs(m(input_ids=x).logits[0, p - 1:-1],
                                  torch.tensor(ids, device=engine_dev)).tolist()
        assert eng == pytest.approx(mine, abs=2e-2)
    finally:
        cl.close()
        bus.close()

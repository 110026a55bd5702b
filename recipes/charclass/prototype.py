"""In-process GRPO on the charclass task: the reward curve to expect, without the bus.

    python recipes/charclass/make_data.py
    python recipes/charclass/prototype.py                      # recommended settings, ~20 s
    python recipes/charclass/prototype.py --seeds 0 1 2 3      # several sampling seeds
    python recipes/charclass/prototype.py --lr 3e-3 --steps 40 # faster, less reliable

What it does, per step (the same math the distributed job runs, minus processes):
1. take `groups` training rows, render each prompt with the tokenizer's chat template, sample
   `n` responses each with `model.generate` (temperature 1, top_k 0, top_p 1: the sampling
   distribution is the plain model distribution, as the embedded engine's logprobs assume);
2. reward each response with the recipe's CharClassEvaluator (decoded with special tokens
   skipped, exactly as the rollout worker does);
3. GRPO: nexrl.algorithms.group_advantages, then nexrl.algorithms.policy_loss (token-mean,
   one on-policy update per batch, as `trainer.ppo_epochs: 1`), AdamW, grad clip 1.0.
Every `val_every` steps it samples once per validation row (temperature 1) and reports the
mean reward, like the validator does with `val_n_samples: 1`.

The model is nexrl.tiny's random-init Qwen2 (2 layers, d=64, byte-level vocab of 259), built
with the same arguments the recipe uses, so step 0 is the job's random-policy baseline.
torch runs on one thread (`--threads`): in the distributed job the trainer shares 2 cores
with ~7 other processes.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # the recipe's evaluator.py


def load_rows(path: Path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def run(args: argparse.Namespace, seed: int) -> list[dict]:
    """One training run; returns the curve [{step, train_reward, val_reward, val_correct, wall_s}]."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evaluator import CharClassEvaluator
    from nexrl.algorithms import AlgorithmConfig, group_advantages, policy_loss
    from nexrl.evaluators import EvaluationTarget
    from nexrl.tiny import build_tiny_model

    torch.set_num_threads(args.threads)
    torch.manual_seed(seed)
    rng = random.Random(seed)
    path = build_tiny_model(args.model, seed=args.model_seed)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    train, val = load_rows(Path(args.data) / "train.jsonl"), load_rows(Path(args.data) / "val.jsonl")
    evaluator = CharClassEvaluator()
    stops = {tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")}
    pad = tok.pad_token_id

    def prompt_ids(row: dict) -> list[int]:
        text = tok.apply_chat_template(row["prompt"], add_generation_prompt=True, tokenize=False)
        return tok.encode(text, add_special_tokens=False)

    def sample(rows: list[dict], n: int) -> tuple[list[list[int]], list[list[int]]]:
        """(prompt ids, response ids up to and including the stop token), row-major."""
        ids = [prompt_ids(r) for r in rows]
        width = max(map(len, ids))
        x = torch.tensor([[pad] * (width - len(i)) + i for i in ids])
        mask = torch.tensor([[0] * (width - len(i)) + [1] * len(i) for i in ids])
        with torch.no_grad():
            out = model.generate(x, attention_mask=mask, do_sample=True, temperature=1.0,
                                 top_k=0, top_p=1.0, max_new_tokens=args.max_tokens,
                                 num_return_sequences=n)
        responses = []
        for row in out[:, width:].tolist():
            cut = next((j + 1 for j, t in enumerate(row) if t in stops), len(row))
            responses.append(row[:cut])
        return [i for i in ids for _ in range(n)], responses

    def rewards(rows: list[dict], n: int, responses: list[list[int]]) -> list[tuple[float, float]]:
        out = []
        for k, resp in enumerate(responses):
            target = EvaluationTarget(final_answer=tok.decode(resp, skip_special_tokens=True),
                                      response_ids=resp)
            res = evaluator.evaluate(rows[k // n], target)
            out.append((res.reward, res.metrics["correct"]))
        return out

    def validate() -> tuple[float, float]:
        model.eval()
        _, resp = sample(val, args.val_n)
        got = rewards(val, args.val_n, resp)
        return sum(r for r, _ in got) / len(got), sum(c for _, c in got) / len(got)

    cfg = AlgorithmConfig(loss_agg="token-mean")
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    curve: list[dict] = []
    t0 = time.monotonic()
    train_reward = float("nan")
    for step in range(args.steps + 1):
        if step % args.val_every == 0 or step == args.steps:
            vr, vc = validate()
            curve.append(dict(step=step, train_reward=round(train_reward, 3), val_reward=round(vr, 3),
                              val_correct=round(vc, 3), wall_s=round(time.monotonic() - t0, 1)))
            print(f"seed {seed} step {step:3d}  train reward {train_reward:.3f}  val reward "
                  f"{vr:.3f}  val correct {vc:.3f}  {time.monotonic() - t0:5.1f}s", flush=True)
        if step == args.steps:
            break
        rows = [rng.choice(train) for _ in range(args.groups)]
        model.eval()
        pids, resp = sample(rows, args.n)
        r = torch.tensor([x for x, _ in rewards(rows, args.n, resp)])
        train_reward = float(r.mean())
        adv = group_advantages(r, [k // args.n for k in range(len(resp))])
        model.train()
        seqs = [p + q for p, q in zip(pids, resp)]
        width = max(map(len, seqs))
        inp = torch.tensor([s + [pad] * (width - len(s)) for s in seqs])
        mask = torch.zeros(len(seqs), width - 1)
        for k, (p, q) in enumerate(zip(pids, resp)):
            mask[k, len(p) - 1:len(p) - 1 + len(q)] = 1  # position t predicts token t + 1
        logits = model(inp).logits[:, :-1].float()
        logp = torch.log_softmax(logits, -1).gather(-1, inp[:, 1:, None]).squeeze(-1)
        loss, _ = policy_loss(logp, None, adv, mask, cfg)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        opt.step()
    return curve


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(HERE / "data"))
    ap.add_argument("--model", default="/tmp/nexrl-charclass/tiny", help="where the tiny model is built")
    ap.add_argument("--model-seed", type=int, default=0, help="nexrl.tiny init seed")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--groups", type=int, default=8, help="prompts per step (batch_groups)")
    ap.add_argument("--n", type=int, default=16, help="samples per prompt (group size)")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--grad-clip", type=float, default=1.0)
    ap.add_argument("--max-tokens", type=int, default=4)
    ap.add_argument("--val-every", type=int, default=10)
    ap.add_argument("--val-n", type=int, default=1, help="samples per validation row")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0], help="sampling seeds, one run each")
    ap.add_argument("--json", help="write the curves here")
    args = ap.parse_args()
    curves = {seed: run(args, seed) for seed in args.seeds}
    if len(args.seeds) > 1:
        print("\nval reward by step (one row per seed):")
        print("step  " + " ".join(f"{c['step']:>5d}" for c in curves[args.seeds[0]]))
        for seed, curve in curves.items():
            print(f"s{seed:<4d} " + " ".join(f"{c['val_reward']:5.2f}" for c in curve))
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "curves": curves}, indent=1))


if __name__ == "__main__":
    main()

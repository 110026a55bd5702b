"""recipes/gsm8k_qwen2.5, the GPU recipe, checked on a machine without a GPU or a model.

    python -m pytest tests/test_gpu_recipe.py -q

What can be checked here, and is: the real `nexrl-launch --dry-run` plan of both placements
(processes, GPUs, CUDA_VISIBLE_DEVICES, commands; the sglang command line against
nodes/inference/sglang.py's build_command), every node's config built as the launcher
builds it, config errors (exit 2 naming the key or the missing path), and prepare_data.py on
a small GSM8K-style parquet written here, read back by the dataloader's own reader and
scored by the built-in math evaluator. What cannot: loading Qwen2.5 or running on GPUs (no
model, no GPU, no hub access here); nothing is started or downloaded.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from nexrl.launch import cli
from nexrl.launch.placement import load_placement
from nexrl.launch.resolve import load_recipe, resolve

REPO = Path(__file__).resolve().parent.parent
RECIPE = REPO / "recipes" / "gsm8k_qwen2.5"
PLACEMENT = RECIPE / "placement.yaml"
SGLANG_PLACEMENT = RECIPE / "placement.sglang.yaml"
ENV_KEYS = ("NEXRL_MODEL_PATH", "NEXRL_GSM8K_DIR")
SOLUTIONS = [  # (question, GSM8K-style worked solution, expected final answer)
    ("Tom has 3 boxes of 24 pens. How many pens?", "3 boxes * 24 = <<3*24=72>>72 pens.\n#### 72", "72"),
    ("A car costs $1,000 plus $200 tax. Total?", "1,000 + 200 = <<1000+200=1200>>1,200\n#### 1,200", "1200"),
    ("It is 5 degrees and drops 8. Temperature?", "5 - 8 = -3\n#### -3", "-3"),
]


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ENV_KEYS}
    env.update(extra)
    return env


def _run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True,
                          timeout=60, env=env or _clean_env())


def _write_gsm8k(tmp: Path) -> tuple[Path, Path]:
    """A train parquet (pyarrow) and a test jsonl in GSM8K's column layout."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    train = tmp / "raw" / "train.parquet"
    train.parent.mkdir(parents=True)
    pq.write_table(pa.table({"question": [q for q, _, _ in SOLUTIONS],
                             "answer": [s for _, s, _ in SOLUTIONS]}), train)
    test = tmp / "raw" / "test.jsonl"
    test.write_text("".join(json.dumps({"question": q, "answer": s}) + "\n"
                            for q, s, _ in SOLUTIONS[:2]))
    return train, test


@pytest.fixture
def paths(tmp_path: Path) -> dict[str, Path]:
    """A (never loaded) model directory and a data directory made by prepare_data.py."""
    model = tmp_path / "Qwen2.5-1.5B-Instruct"
    model.mkdir()
    train, test = _write_gsm8k(tmp_path)
    data = tmp_path / "data"
    r = _run(str(RECIPE / "prepare_data.py"), "--train", str(train), "--test", str(test),
             "--out-dir", str(data))
    assert r.returncode == 0, r.stderr
    return {"model": model, "data": data, "train": train, "test": test, "run": tmp_path / "run"}


def _plan(stdout: str) -> dict[str, dict[str, str]]:
    """The --dry-run text per node: {name: {"header", "command", "env"}}."""
    nodes: dict[str, dict[str, str]] = {}
    current = None
    for line in stdout.splitlines():
        if line.startswith("  ") and not line.startswith("    ") and ": role " in line:
            current = line.strip().split(":", 1)[0]
            nodes[current] = {"header": line.strip()}
        elif current and line.startswith("    command: "):
            nodes[current]["command"] = line[len("    command: "):]
        elif current and line.startswith("    env:     "):
            nodes[current]["env"] = line[len("    env:     "):]
    return nodes


def _env_of(node: dict[str, str]) -> dict[str, str]:
    return dict(kv.split("=", 1) for kv in shlex.split(node["env"]))


def _check_common_plan(nodes: dict[str, dict[str, str]], engine: str, run: Path) -> None:
    """The layout both placements share: trainer on GPU 0, 7 engines on 1-7, CPU roles."""
    cpu = ["dataloader", "pool", "validator", "tracker", "weight_sync",
           *(f"rollout-{i}" for i in range(4))]
    engines = [f"{engine}-{i}" for i in range(7)]
    assert sorted(nodes) == sorted([*cpu, *engines, "trainer"])
    t = nodes["trainer"]
    assert "role trainer" in t["header"] and "GPUs 0," in t["header"] and "completes_job" in t["header"]
    assert _env_of(t)["CUDA_VISIBLE_DEVICES"] == "0"
    assert t["command"].endswith(f"-m nexrl.cli.node trainer --placement "
                                 f"{run}/placement.resolved.yaml --name trainer")
    for i, name in enumerate(engines):
        e = nodes[name]
        assert "role inference" in e["header"] and f"GPUs {i + 1}," in e["header"]
        env = _env_of(e)
        assert env["CUDA_VISIBLE_DEVICES"] == str(i + 1)
        assert env["NEXRL_URL"].startswith("http://127.0.0.1:") and f"url {env['NEXRL_URL']}" in e["header"]
    assert len({_env_of(nodes[n])["NEXRL_URL"] for n in engines}) == 7
    for name in cpu:
        assert "GPUs none" in nodes[name]["header"] and _env_of(nodes[name])["CUDA_VISIBLE_DEVICES"] == ""
        role = name.rsplit("-", 1)[0] if name.startswith("rollout") else name
        assert f"-m nexrl.cli.node {role} --placement" in nodes[name]["command"]
    assert "restart on-failure" in nodes["rollout-0"]["header"]
    assert not run.exists()  # a dry run writes nothing


# ---------------------------------------------------------------------------- dry runs

def test_dry_run_embedded_engines(paths: dict[str, Path]) -> None:
    run = paths["run"]
    r = _run("-m", "nexrl.launch.cli", str(PLACEMENT), f"model_path={paths['model']}",
             f"data_dir={paths['data']}", "--dry-run", "--run-dir", str(run))
    assert r.returncode == 0, r.stderr
    assert "nodes (17, in start order)" in r.stdout
    nodes = _plan(r.stdout)
    _check_common_plan(nodes, "inference", run)
    for i in range(7):
        assert nodes[f"inference-{i}"]["command"].endswith(
            f"-m nexrl.cli.node inference --placement {run}/placement.resolved.yaml "
            f"--name inference-{i}")
        assert "ready bus" in nodes[f"inference-{i}"]["header"]


def test_dry_run_sglang_engines(paths: dict[str, Path]) -> None:
    from nexrl.nodes.inference.sglang import SGLangConfig, build_command

    run = paths["run"]
    env = _clean_env(NEXRL_MODEL_PATH=str(paths["model"]), NEXRL_GSM8K_DIR=str(paths["data"]))
    r = _run("-m", "nexrl.launch.cli", str(SGLANG_PLACEMENT), "--dry-run", "--run-dir", str(run),
             env=env)
    assert r.returncode == 0, r.stderr
    nodes = _plan(r.stdout)
    _check_common_plan(nodes, "sglang", run)
    ports = set()
    for i in range(7):
        node = nodes[f"sglang-{i}"]
        e = _env_of(node)
        url, port = e["NEXRL_URL"], int(e["NEXRL_URL"].rsplit(":", 1)[1])
        assert f"ready {url}/health" in node["header"]
        argv = shlex.split(node["command"])
        assert argv[0] == sys.executable and argv[1:3] == ["-m", "sglang.launch_server"]
        # the same flags the sglang adapter builds for this server (order aside)
        want = build_command(SGLangConfig(
            model_path=str(paths["model"]), host="127.0.0.1", port=port, tp_size=1,
            dtype="bfloat16", weight_version="0", context_length=2048, mem_fraction_static=0.85,
            nccl_port=int(e["NEXRL_PORT"]), disable_radix_cache=True, log_level="info"))
        assert want[:3] == argv[:3] and _flags(argv[3:]) == _flags(want[3:]), (argv, want)
        ports.add(int(e["NEXRL_PORT"]))
    assert len(ports) == 7  # distinct sglang NCCL ports on one host


def _flags(args: list[str]) -> dict[str, str | None]:
    """--flag value / --switch pairs of an argv tail."""
    out: dict[str, str | None] = {}
    i = 0
    while i < len(args):
        assert args[i].startswith("--"), args[i:]
        if i + 1 < len(args) and not args[i + 1].startswith("--"):
            out[args[i]] = args[i + 1]
            i += 2
        else:
            out[args[i]] = None
            i += 1
    return out


# ---------------------------------------------------------------------------- config validation

def _configs(placement: Path, overrides: list[str]) -> dict[str, dict]:
    """Every node's config, built exactly as nexrl-launch builds it before starting anything."""
    p = load_placement(placement)
    plan = resolve(p, load_recipe(p, [], overrides), run_dir="")
    return cli.validate(plan)


@pytest.mark.parametrize("placement", [PLACEMENT, SGLANG_PLACEMENT])
def test_node_configs_validate(paths: dict[str, Path], placement: Path,
                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NEXRL_MODEL_PATH", str(paths["model"]))
    monkeypatch.setenv("NEXRL_GSM8K_DIR", str(paths["data"]))
    sglang = placement == SGLANG_PLACEMENT
    cfg = _configs(placement, [])
    t, dl, ro = cfg["trainer"]["trainer"], cfg["dataloader"]["dataloader"], cfg["rollout-0"]["rollout"]
    assert t["model_path"] == ro["model_path"] == str(paths["model"]) and t["device"] == "cuda"
    assert dl["train_files"] == [f"{paths['data']}/train.jsonl"]
    assert dl["val_files"] == [f"{paths['data']}/test.jsonl"]
    assert dl["batch_groups"] == t["batch_groups"] == 32 and dl["n_samples"] == 8
    assert cfg["pool"]["pool"]["group_size"] == 8 and dl["max_staleness"] == 0
    assert t["optim"]["lr"] == 1e-6 and t["algorithm"]["kl_coef"] == 0.0
    assert (t["algorithm"]["clip_low"], t["algorithm"]["clip_high"]) == (0.2, 0.28)
    assert t["mini_batches"] > 1  # else the ratio is 1 and clip-higher does nothing
    assert ro["temperature"] == t["temperature"] == 1.0 and ro["evaluator"] == "math"
    assert cfg["tracker"]["tracker"]["total_steps"] == t["total_steps"]
    engines = [n for n, peer in cfg["trainer"]["node"]["peers"].items() if peer["role"] == "inference"]
    assert len(engines) == 7 and all(cfg["trainer"]["node"]["peers"][n]["url"] for n in engines)
    assert t["pipelined"] is (not sglang) and ro["standard_logprobs"] is sglang
    assert cfg["weight_sync"]["weight_sync"]["pause_mode"] == ("retract" if sglang else "auto")
    if not sglang:
        inf = cfg["inference-0"]["inference"]
        assert inf["model_path"] == str(paths["model"]) and inf["device"] == "cuda"


def test_config_errors_exit_2(paths: dict[str, Path], monkeypatch: pytest.MonkeyPatch,
                              capsys: pytest.CaptureFixture) -> None:
    for key in ENV_KEYS:
        monkeypatch.delenv(key, raising=False)
    both = [f"model_path={paths['model']}", f"data_dir={paths['data']}"]

    def launch(placement: Path, *args: str) -> str:
        assert cli.main([str(placement), *args, "--dry-run"]) == 2
        return capsys.readouterr().err

    err = launch(PLACEMENT, *both, "trainer.lrr=1")
    assert "node trainer" in err and "'lrr'" in err and "TrainerConfig" in err, err
    err = launch(PLACEMENT, *both, "trainer.algorithm.clip_hi=0.3")
    assert "clip_hi" in err and "clip_high" in err, err  # the close key is suggested
    err = launch(PLACEMENT, f"data_dir={paths['data']}")
    assert "model_path" in err and "NEXRL_MODEL_PATH" in err and "not found" in err, err
    err = launch(PLACEMENT, f"model_path={paths['model']}")
    assert "data_dir" in err and "NEXRL_GSM8K_DIR" in err, err
    err = launch(SGLANG_PLACEMENT, *both)  # the sglang command line needs the variable
    assert "placement.sglang.yaml" in err and "NEXRL_MODEL_PATH" in err, err
    monkeypatch.setenv("NEXRL_MODEL_PATH", str(paths["model"]))
    monkeypatch.setenv("NEXRL_GSM8K_DIR", str(paths["data"]))
    assert cli.main([str(SGLANG_PLACEMENT), "--dry-run", "--run-dir", str(paths["run"])]) == 0
    capsys.readouterr()


# ---------------------------------------------------------------------------- data

def test_prepare_data_rows_load_and_score(paths: dict[str, Path]) -> None:
    from nexrl.evaluators import EvaluationTarget, load_evaluator
    from nexrl.nodes.dataloader import DataloaderConfig, load_rows

    spec = importlib.util.spec_from_file_location("gsm8k_prepare_data", RECIPE / "prepare_data.py")
    prepare = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(prepare)
    assert prepare.final_answer("a\n#### 1,234.") == "1234" and prepare.final_answer("no") is None
    train = [json.loads(x) for x in (paths["data"] / "train.jsonl").read_text().splitlines()]
    test = [json.loads(x) for x in (paths["data"] / "test.jsonl").read_text().splitlines()]
    assert len(train) == 3 and len(test) == 2
    for i, (row, (q, _, ans)) in enumerate(zip(train, SOLUTIONS)):
        assert row == {"prompt": [{"role": "user", "content": f"{q}\n{prepare.DEFAULT_INSTRUCTION}"}],
                       "answer": ans, "data_source": "gsm8k", "index": i}
    # the dataloader's own reader takes every row (the recipe's format is its format)
    bad: list = []
    cfg = DataloaderConfig(train_files=[str(paths["data"] / "train.jsonl")])
    rows = load_rows([str(paths["data"] / "train.jsonl"), str(paths["data"] / "test.jsonl")],
                     cfg, lambda *a: bad.append(a))
    assert not bad and len(rows) == 5 and {r.source for r in rows} == {"gsm8k"}
    # the recipe's evaluator (rollout.evaluator=math, answer_key=answer) on these rows
    ev = load_evaluator("math", {"answer_key": "answer"})
    for row, (_, solution, ans) in zip(train, SOLUTIONS):
        assert ev.evaluate(row, EvaluationTarget(final_answer=solution)).reward == 1.0
        boxed = ev.evaluate(row, EvaluationTarget(final_answer=f"So it is \\boxed{{{ans}}}."))
        assert boxed.reward == 1.0 and boxed.metrics["correct"] == 1.0
        wrong = ev.evaluate(row, EvaluationTarget(final_answer="The answer is \\boxed{7}."))
        assert wrong.reward == 0.0 and wrong.metrics["correct"] == 0.0


def test_prepare_data_refuses_rows_without_final_answer(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "q1", "answer": "x\n#### 4"}) + "\n"
                   + json.dumps({"question": "q2", "answer": "no marker here"}) + "\n")
    r = _run(str(RECIPE / "prepare_data.py"), "--train", str(bad), "--test", str(bad),
             "--out-dir", str(tmp_path / "out"))
    assert r.returncode == 2 and str(bad) in r.stderr and "row 1" in r.stderr, r.stderr
    assert "'####'" in r.stderr and not (tmp_path / "out" / "train.jsonl").exists()
    r = _run(str(RECIPE / "prepare_data.py"), "--train", str(tmp_path / "nope.parquet"),
             "--test", str(bad), "--out-dir", str(tmp_path / "out"))
    assert r.returncode == 2 and "nope.parquet does not exist" in r.stderr, r.stderr

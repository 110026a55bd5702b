"""Trainer checkpoints: the consistent cut that resume starts from.

    <run_dir>/checkpoints/
        step_12/                      a complete checkpoint (only complete ones have this name)
            config.json, model.safetensors, tokenizer files ...   HF format (save_pretrained)
            optimizer.pt              {"optimizer": ..., "scheduler": ...} (torch.save)
            trainer_state.json        {"step", "version", "rng": {python, numpy, torch, cuda},
                                       "consumed": [item_id, ...], "extra": {...}}
            data_state.json           {"dataloader": <state.get reply>, "pool": <state.get
                                       reply>, "consumed": [item_id, ...]}
        .tmp-step_13-<pid>-<rand>/    being written (ignored by resume; removed by the next save)

Atomicity: everything is written into a hidden temporary directory next to the final one,
files are fsync'ed, then ONE rename makes it visible as ``step_<k>``. A SIGKILL at any moment
leaves either the previous checkpoints only (plus a hidden temp dir that resume ignores) or
the new complete one; never a half checkpoint that ``latest_checkpoint`` would pick.
``latest_checkpoint`` also requires trainer_state.json inside, so a directory someone copied
by hand half-way is not taken either.

States from other nodes (state.get replies) are stored as JSON: numpy arrays become lists,
numpy scalars plain numbers; anything else that JSON cannot hold is an error naming its path.
"""

from __future__ import annotations

import base64
import json
import os
import random
import re
import shutil
import uuid
from dataclasses import dataclass
from typing import Any

STEP_DIR = re.compile(r"^step_(\d+)$")
TRAINER_STATE = "trainer_state.json"
DATA_STATE = "data_state.json"
OPTIMIZER = "optimizer.pt"


class CheckpointError(RuntimeError):
    """A checkpoint cannot be written or read; the message names the path and the cause."""


def to_jsonable(obj: Any, path: str = "state") -> Any:
    """`obj` with numpy arrays/scalars and tuples made JSON-friendly (raises on other types)."""
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v, f"{path}.{k}") for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v, f"{path}[{i}]") for i, v in enumerate(obj)]
    if hasattr(obj, "tolist") and hasattr(obj, "dtype"):  # numpy array/scalar, torch tensor
        return obj.tolist()
    raise CheckpointError(f"checkpoint: {path} is a {type(obj).__name__}, which JSON cannot "
                          f"hold; node states must be JSON-compatible")


# ----------------------------------------------------------------------------- RNG
def rng_state() -> dict[str, Any]:
    """Python, numpy and torch (CPU + every CUDA device) RNG states as JSON-friendly values."""
    import numpy as np
    import torch

    py = random.getstate()
    npst = np.random.get_state()
    out: dict[str, Any] = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [npst[0], npst[1].tolist(), int(npst[2]), int(npst[3]), float(npst[4])],
        "torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode(),
    }
    if torch.cuda.is_available():
        out["cuda"] = [base64.b64encode(s.numpy().tobytes()).decode()
                       for s in torch.cuda.get_rng_state_all()]
    return out


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what rng_state() returned."""
    import numpy as np
    import torch

    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    raw = base64.b64decode(state["torch"])
    torch.set_rng_state(torch.frombuffer(bytearray(raw), dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.frombuffer(bytearray(base64.b64decode(s)),
                                                       dtype=torch.uint8) for s in state["cuda"]])


# ----------------------------------------------------------------------------- files
def _write_json(path: str, obj: Any) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f)
        f.flush()
        os.fsync(f.fileno())


def _fsync_tree(root: str) -> None:
    """fsync every file under `root` and the directory itself (data reaches the disk before
    the rename that publishes it)."""
    for dirpath, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    _fsync_dir(root)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def list_checkpoints(root: str) -> list[tuple[int, str]]:
    """(step, path) of every complete checkpoint under `root`, oldest first."""
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        m = STEP_DIR.match(name)
        path = os.path.join(root, name)
        if m and os.path.isfile(os.path.join(path, TRAINER_STATE)):
            found.append((int(m.group(1)), path))
    return sorted(found)


def latest_checkpoint(root: str) -> str | None:
    """The newest complete checkpoint under `root`, or None."""
    found = list_checkpoints(root)
    return found[-1][1] if found else None


def save_checkpoint(root: str, step: int, *, model: Any, tokenizer: Any, optimizer: Any,
                    scheduler: Any, trainer_state: dict[str, Any], data_state: dict[str, Any],
                    keep: int = 0) -> str:
    """Write `root/step_<step>` atomically (see the module docstring); keep the newest `keep`
    checkpoints (0 = all). Returns the checkpoint's path."""
    import torch

    os.makedirs(root, exist_ok=True)
    for name in os.listdir(root):  # leftovers of a save that was killed
        if name.startswith(".tmp-step_"):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)
    final = os.path.join(root, f"step_{step}")
    tmp = os.path.join(root, f".tmp-step_{step}-{os.getpid()}-{uuid.uuid4().hex[:6]}")
    os.makedirs(tmp)
    try:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()},
                   os.path.join(tmp, OPTIMIZER))
        _write_json(os.path.join(tmp, DATA_STATE), to_jsonable(data_state, "data_state"))
        _write_json(os.path.join(tmp, TRAINER_STATE), to_jsonable(trainer_state, "trainer_state"))
        _fsync_tree(tmp)
        if os.path.exists(final):  # re-saving a step (e.g. the final save after a resume)
            old = final + f".old-{uuid.uuid4().hex[:6]}"
            os.rename(final, old)
            os.rename(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, final)
        _fsync_dir(root)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"checkpoint: cannot write {final}: {e}") from e
    if keep > 0:
        for _, path in list_checkpoints(root)[:-keep]:
            shutil.rmtree(path, ignore_errors=True)
    return final


def read_trainer_state(path: str) -> dict[str, Any]:
    """trainer_state.json of checkpoint `path` (CheckpointError if it is not complete)."""
    f = os.path.join(path, TRAINER_STATE)
    try:
        with open(f, encoding="utf-8") as fh:
            return json.load(fh)
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"checkpoint: {path} is not a complete checkpoint ({f}: {e})") from e


def read_data_state(path: str) -> dict[str, Any]:
    """The data_state.json of a checkpoint directory (or that file itself), checked."""
    p = path if not os.path.isdir(path) else os.path.join(path, DATA_STATE)
    try:
        with open(p, encoding="utf-8") as fh:
            state = json.load(fh)
    except OSError as e:
        raise FileNotFoundError(f"resume: cannot read {p}: {e.strerror}") from e
    except json.JSONDecodeError as e:
        raise ValueError(f"resume: {p} is not valid JSON: {e}") from e
    if not isinstance(state, dict) or not isinstance(state.get("consumed", []), list):
        raise ValueError(f"resume: {p} must hold a JSON object with a 'consumed' list")
    return state


@dataclass
class ResumeConfig:
    """The resume settings of the nodes that restore their part of a trainer checkpoint
    (dataloader, pool: the checkpoint's data_state.json); their configs extend this."""

    #: Checkpoint to resume from: a checkpoint directory (or its data_state.json), "auto" =
    #: the newest complete one under checkpoint_dir, "" = fresh start (recipe: ${trainer.resume}).
    resume_from: str = ""
    #: Where "auto" looks; "" = <node.run_dir>/checkpoints (recipe: ${trainer.checkpoint_dir}).
    checkpoint_dir: str = ""


def resolve_resume(resume_from: str, checkpoint_dir: str, run_dir: str) -> str:
    """The checkpoint directory `resume_from` names: "auto" = the newest complete one under
    checkpoint_dir (default <run_dir>/checkpoints), "" = a fresh start, else the path itself."""
    if resume_from != "auto":
        return resume_from
    root = checkpoint_dir or (os.path.join(run_dir, "checkpoints") if run_dir else "")
    if not root:
        raise ValueError("resume=auto needs node.run_dir or a checkpoint_dir")
    return latest_checkpoint(root) or ""


def load_optimizer(path: str, optimizer: Any, scheduler: Any) -> None:
    """Restore optimizer + scheduler state saved by save_checkpoint."""
    import torch

    f = os.path.join(path, OPTIMIZER)
    try:
        state = torch.load(f, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError) as e:
        raise CheckpointError(f"checkpoint: cannot read {f}: {e}") from e
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])

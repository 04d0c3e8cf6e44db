"""Atomic training checkpoints: ``torch.save`` to a temp file in the same folder, fsync,
then ``os.replace`` over the target, so a run killed at any point leaves either the
previous checkpoint or the new one, never a torn file."""

from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

CHECKPOINT_NAME = "checkpoint.pt"
FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be resumed (corrupt, other config, other format)."""


class RunExistsError(CheckpointError):
    """A fresh run would overwrite the reports or checkpoints of an earlier run of the same name."""


def refuse_overwrite(run_dir: Path) -> None:
    """Raise :class:`RunExistsError` if ``run_dir`` holds an earlier run's reports or checkpoints."""
    if not run_dir.is_dir():
        return
    found = [run_dir / "comparison.md"] + [p / f for p in sorted(run_dir.iterdir()) if p.is_dir()
                                           for f in ("report.json", CHECKPOINT_NAME)]
    found = [p for p in found if p.is_file()]
    if found:
        raise RunExistsError(
            f"{run_dir} already holds a run ({', '.join(str(p) for p in found[:3])}"
            f"{', ...' if len(found) > 3 else ''}): continue it with --resume (same config), give this run "
            "another name (name=<new> or output_dir=<dir>), or replace it with --overwrite")


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(dict(payload, format_version=FORMAT_VERSION), f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def config_diff(saved: dict, now: dict, prefix: str = "") -> list[str]:
    """``key: saved -> now`` for every dotted config key whose value differs."""
    out = []
    for k in sorted(set(saved) | set(now)):
        a, b = saved.get(k), now.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_diff(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}: {a!r} in the checkpoint, {b!r} now")
    return out


def load_checkpoint(path: Path, fingerprint: str, config: Optional[dict] = None) -> Optional[dict[str, Any]]:
    """The checkpoint at ``path`` (None if there is none); refuses one of another config, naming
    the config keys that differ (``config``: this run's, compared with the one the checkpoint holds)."""
    if not path.is_file():
        return None
    try:
        payload = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise CheckpointError(f"{path} could not be read ({type(e).__name__}: {e})") from e
    if not isinstance(payload, dict) or payload.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path} is not a checkpoint of this trainer version")
    if payload.get("fingerprint") != fingerprint:
        saved = payload.get("config")
        if isinstance(saved, dict) and config is not None:
            diff = config_diff(saved, config)
            why = "; ".join(diff) if diff else "the same config, but the task data changed since"
        else:
            why = f"fingerprint {payload.get('fingerprint')} != {fingerprint}"
        raise CheckpointError(
            f"{path} was written by a run with another config ({why}); resume with the same config, "
            "or use a new run name"
        )
    return payload

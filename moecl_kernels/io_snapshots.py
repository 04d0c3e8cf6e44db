"""Frozen tasks' snapshots in ``mk.save`` / ``mk.load`` files (format version 2; version 1 files
have none). Named by the model's own module names, like the adapter tensors:

    <module>.moe_snap_tasks   int64 [F]     the task of each slot
    <module>.moe_snap_gate    [F, 2, d_in]  (gated modules)
    <projection>.moe_snap_A   [F, r, d_in]  <projection>.moe_snap_B [F, d_out, r]

``check`` validates them against the adapter shapes the model has (or will have after
injection) before anything changes; ``apply`` installs them (and clears the snapshots of a
module the file has none for: a load gives the saved state).
"""

from __future__ import annotations

import re

import torch
import torch.nn as nn

from . import snapshots
from .integration import moe_layers

SNAP_KEY = re.compile(r"\.moe_snap_(tasks|gate|A|B)$")
_LIVE = {snapshots.SNAP_A: "lora_shared_A", snapshots.SNAP_B: "lora_shared_B", snapshots.GATE: "moe_gate"}


def collect(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every snapshot buffer of the injected modules of ``model``, by its name in ``model``."""
    names = {id(m): n for n, m in model.named_modules()}
    out = {}
    for lname, layer in moe_layers(model).items():
        if not snapshots.frozen_tasks(layer):
            continue
        out[f"{lname}.{snapshots.TASKS}"] = layer._buffers[snapshots.TASKS]
        for owner, name, _ in snapshots.owners(layer):
            out[f"{names[id(owner)]}.{name}".lstrip(".")] = owner._buffers[name]
    return out


def split(tensors: dict) -> tuple[dict, dict]:
    """(adapter tensors, snapshot tensors) of a file's tensors."""
    snaps = {k: v for k, v in tensors.items() if SNAP_KEY.search(k)}
    return {k: v for k, v in tensors.items() if k not in snaps}, snaps


def _module_of(path: str, modules: list[str]) -> str:
    """The module a snapshot owner belongs to: the one sharing the longest dotted prefix (a BERT
    layer's down projection lives beside its MLP, at output.dense)."""
    def common(a: str, b: str) -> int:
        n = 0
        for x, y in zip(a.split("."), b.split(".")):
            if x != y:
                break
            n += 1
        return n

    return max(modules, key=lambda m: (common(path, m), -len(m)))


def check(snaps: dict, expected: dict, modules: list[str], num_tasks: int, error) -> dict[str, list[int]]:
    """The frozen tasks of every module of the file (module -> tasks); ``error`` (an exception
    class) for anything that does not fit ``expected`` (adapter name -> shape)."""
    tasks = {}
    for k, v in snaps.items():
        if k.endswith(f".{snapshots.TASKS}"):
            m = k[: -len(snapshots.TASKS) - 1]
            if m not in modules:
                raise error(f"snapshot {k!r} belongs to no saved module")
            if v.dim() != 1 or v.is_floating_point():
                raise error(f"snapshot {k!r} must be an int64 [F] tensor, got {v.dtype} {tuple(v.shape)}")
            t = [int(i) for i in v.tolist()]
            if len(set(t)) != len(t) or any(not 0 <= i < num_tasks for i in t):
                raise error(f"snapshot {k!r} holds {t}: tasks must be distinct and in [0, {num_tasks})")
            tasks[m] = t
    for k, v in snaps.items():
        if k.endswith(f".{snapshots.TASKS}"):
            continue
        owner, name = k.rsplit(".", 1)
        live = f"{owner}.{_LIVE[name]}"
        if live not in expected:
            raise error(f"snapshot {k!r} has no adapter {live!r} in the model")
        m = _module_of(owner, modules)
        if m not in tasks:
            raise error(f"snapshot {k!r} comes without {m}.{snapshots.TASKS} (which task each slot is)")
        want = (len(tasks[m]), *expected[live])
        if tuple(v.shape) != want:
            raise error(f"snapshot {k!r} has shape {tuple(v.shape)}, expected {want}")
        if not v.is_floating_point() or not torch.isfinite(v).all():
            raise error(f"snapshot {k!r} must hold finite floating values")
    inverse = {v: k for k, v in _LIVE.items()}
    for live in expected:
        owner, name = live.rsplit(".", 1)
        if name in inverse and _module_of(owner, modules) in tasks and f"{owner}.{inverse[name]}" not in snaps:
            raise error(f"snapshot {owner}.{inverse[name]!s} is missing (its module has frozen tasks)")
    return tasks


def apply(model: nn.Module, snaps: dict, tasks: dict[str, list[int]]) -> None:
    """Install the checked snapshots (and clear those of modules the file has none for)."""
    names = {id(m): n for n, m in model.named_modules()}
    for lname, layer in moe_layers(model).items():
        t = tasks.get(lname, [])
        snapshots.restore(layer, t, lambda owner, name: snaps.get(f"{names[id(owner)]}.{name}".lstrip(".")))

"""``save`` / ``load`` of every MoE-CL parameter: safetensors + a JSON config.

``load`` reads and validates everything (config, every tensor's presence, shape and
dtype) before touching the model; on any error the model is left unchanged.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Union

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from ._version import __version__
from .integration import config as _config
from .integration import find_targets, inject, is_injected, moe_layers

WEIGHTS_NAME = "moecl_adapter.safetensors"
CONFIG_NAME = "moecl_config.json"
FORMAT_VERSION = 1
_INJECT_KEYS = ("target_modules", "num_tasks", "r", "alpha", "dropout", "gate", "rslora")


class LoadError(ValueError):
    """The saved adapter does not fit the model (or is corrupt); the model was not changed."""


def _adapter_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    out = {}
    for name, layer in moe_layers(model).items():
        out[f"{name}.lora_shared_A"] = layer.lora_shared_A
        out[f"{name}.lora_shared_B"] = layer.lora_shared_B
        for k, (a, b) in enumerate(zip(layer.lora_task_A, layer.lora_task_B)):
            out[f"{name}.lora_task_A.{k}"] = a
            out[f"{name}.lora_task_B.{k}"] = b
        if layer.moe_gate is not None:
            out[f"{name}.moe_gate"] = layer.moe_gate
    return out


def _atomic_write(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save(model: nn.Module, path: Union[str, os.PathLike]) -> Path:
    """Write ``path/moecl_adapter.safetensors`` and ``path/moecl_config.json`` (atomically)."""
    cfg = _config(model)
    d = Path(path)
    d.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu().clone() for k, v in _adapter_tensors(model).items()}
    meta = dict(cfg, format_version=FORMAT_VERSION, moecl_kernels_version=__version__,
                modules=sorted(moe_layers(model)),
                shapes={k: list(v.shape) for k, v in tensors.items()})
    _atomic_write(d / WEIGHTS_NAME, lambda p: save_file(tensors, p, metadata={"format": "pt"}))
    _atomic_write(d / CONFIG_NAME, lambda p: Path(p).write_text(json.dumps(meta, indent=2, sort_keys=True)))
    return d


def _read(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    cfg_path, w_path = path / CONFIG_NAME, path / WEIGHTS_NAME
    for p in (cfg_path, w_path):
        if not p.is_file():
            raise LoadError(f"path {str(path)!r} has no {p.name}")
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, ValueError) as e:
        raise LoadError(f"{cfg_path} is not valid JSON: {e}") from e
    if not isinstance(cfg, dict) or cfg.get("format_version") != FORMAT_VERSION:
        raise LoadError(f"{cfg_path}: unsupported format_version {cfg.get('format_version') if isinstance(cfg, dict) else None!r}")
    missing = [k for k in _INJECT_KEYS + ("modules",) if k not in cfg]
    if missing:
        raise LoadError(f"{cfg_path} lacks keys {missing}")
    try:
        tensors = load_file(str(w_path))
    except Exception as e:  # truncated / corrupt file
        raise LoadError(f"{w_path} could not be read ({type(e).__name__}: {e})") from e
    return cfg, tensors


def load(model: nn.Module, path: Union[str, os.PathLike], strict_config: bool = True) -> nn.Module:
    """Load a saved adapter into ``model``.

    A plain (not yet injected) model is injected with the saved config first; an injected
    model must have the same modules, rank, task count and gate setting. Everything is
    validated before the model changes; on error (:class:`LoadError`) it is untouched.
    """
    d = Path(path)
    cfg, tensors = _read(d)
    modules = list(cfg["modules"])
    if is_injected(model):
        have = _config(model)
        diffs = {k: (cfg[k], have[k]) for k in ("num_tasks", "r", "gate", "rslora") if cfg[k] != have[k]}
        if strict_config:
            diffs.update({k: (cfg[k], have[k]) for k in ("alpha",) if cfg[k] != have[k]})
        if diffs:
            raise LoadError(f"saved config differs from the model's (saved, model): {diffs}")
        if sorted(moe_layers(model)) != sorted(modules):
            raise LoadError(
                f"saved modules differ from the model's injected modules: only saved {sorted(set(modules) - set(moe_layers(model)))[:5]}, "
                f"only in model {sorted(set(moe_layers(model)) - set(modules))[:5]}"
            )
        targets = _adapter_tensors(model)
    else:
        try:
            names = find_targets(model, cfg["target_modules"])
        except (ValueError, TypeError) as e:
            raise LoadError(f"the model does not fit the saved target_modules: {e}") from e
        if sorted(names) != sorted(modules):
            raise LoadError(f"the model's matching modules differ from the saved ones: {sorted(set(names) ^ set(modules))[:5]}")
        targets = None
    # expected keys and shapes, checked without changing the model
    expected = {}
    for name in modules:
        lin = model.get_submodule(name)
        d_out, d_in = lin.weight.shape
        r = int(cfg["r"])
        expected[f"{name}.lora_shared_A"] = (r, d_in)
        expected[f"{name}.lora_shared_B"] = (d_out, r)
        for k in range(int(cfg["num_tasks"])):
            expected[f"{name}.lora_task_A.{k}"] = (r, d_in)
            expected[f"{name}.lora_task_B.{k}"] = (d_out, r)
        if cfg["gate"]:
            expected[f"{name}.moe_gate"] = (2, d_in)
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing or extra:
        raise LoadError(f"{d / WEIGHTS_NAME}: missing tensors {missing[:5]}, unexpected tensors {extra[:5]}")
    for k, shape in expected.items():
        t = tensors[k]
        if tuple(t.shape) != shape:
            raise LoadError(f"tensor {k!r} has shape {tuple(t.shape)}, expected {shape}")
        if not t.is_floating_point():
            raise LoadError(f"tensor {k!r} has dtype {t.dtype}, expected a floating dtype")
        if not torch.isfinite(t).all():
            raise LoadError(f"tensor {k!r} holds non-finite values")
    # all checks passed: now change the model
    if targets is None:
        inject(model, **{k: cfg[k] for k in _INJECT_KEYS})
        targets = _adapter_tensors(model)
    with torch.no_grad():
        for k, p in targets.items():
            p.copy_(tensors[k].to(dtype=p.dtype, device=p.device))
    for layer in moe_layers(model).values():
        layer._stack_cache = None
    return model

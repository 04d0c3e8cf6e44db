"""``save`` / ``load`` of every MoE-CL parameter: safetensors + a JSON config.

``load`` reads and validates everything (config, every tensor's presence, shape and
dtype) before touching the model; on any error the model is left unchanged. The config
records the injection ``level`` (``linear`` or ``ffn``; a config without one is ``linear``).
Tensors are named by the model's own parameter names (a BERT-style MLP's down projection
lives at its layer's ``output.dense``).
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path
from typing import Union

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from . import io_snapshots
from ._version import __version__
from .integration import CONFIG_ATTR, LEVELS, find_mlp_targets, find_targets, inject, is_injected, moe_layers
from .integration import config as _config
from .experts import is_conv1d
from .layer import FusedMoELoRALinear
from .mlp import FusedMoELoRAMLP
from .peft_compat import modules_to_save, saved_module_parameters

WEIGHTS_NAME = "moecl_adapter.safetensors"
CONFIG_NAME = "moecl_config.json"
HF_CONFIG_NAME = "config.json"  # a save_pretrained() folder of an injected model (its "moecl" entry)
FORMAT_VERSION = 2  # 2: frozen tasks' snapshots (io_snapshots); 1 (none) still loads
_INJECT_KEYS = ("target_modules", "num_tasks", "r", "alpha", "dropout", "gate", "rslora")
_ADAPTER_KEY = re.compile(r"\.(lora_shared_[AB]|lora_task_[AB]\.\d+|moe_gate|moe_snap_(tasks|gate|A|B))$")  # a parameter name of an adapter
_MODULE_CLASS = {"linear": FusedMoELoRALinear, "ffn": FusedMoELoRAMLP}


class LoadError(ValueError):
    """The saved adapter does not fit the model (or is corrupt); the model was not changed."""


def _adapter_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every adapter parameter of the injected modules of ``model``, by its name in ``model``."""
    params = {id(p): p for layer in moe_layers(model).values() for _, p in layer.adapter_parameters()}
    named = {n: p for n, p in model.named_parameters() if id(p) in params}
    if len(named) != len(params):
        raise ValueError(f"{type(model).__name__} does not contain all the adapter parameters of its injected modules "
                         "(a BERT-style MLP's down projection lives in its layer's output.dense): use the layer or model")
    return named


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
    """Write ``path/moecl_adapter.safetensors`` and ``path/moecl_config.json`` (atomically).

    ``model`` is the injected model or any module that contains injected layers; module
    names are relative to it. The ``modules_to_save`` of ``inject`` are saved with the
    adapters, and task experts merged into the base weights (``merge_task``) are recorded, so
    that ``load`` merges them again."""
    cfg = _config(model)
    d = Path(path)
    if d.exists() and not d.is_dir():
        raise ValueError(f"path {str(d)!r} is a file: mk.save writes a folder (adapter weights and config); "
                         "give a folder path")
    d.mkdir(parents=True, exist_ok=True)
    params = dict(_adapter_tensors(model), **saved_module_parameters(model), **io_snapshots.collect(model))
    tensors = {k: v.detach().contiguous().cpu().clone() for k, v in params.items()}
    merged = {name: layer.merged_tasks for name, layer in moe_layers(model).items() if layer.merged_tasks}
    meta = dict(cfg, format_version=FORMAT_VERSION, moecl_kernels_version=__version__,
                modules=sorted(moe_layers(model)), merged=merged,
                shapes={k: list(v.shape) for k, v in tensors.items()})
    _atomic_write(d / WEIGHTS_NAME, lambda p: save_file(tensors, p, metadata={"format": "pt"}))
    _atomic_write(d / CONFIG_NAME, lambda p: Path(p).write_text(json.dumps(meta, indent=2, sort_keys=True)))
    return d


def _read_json(p: Path) -> dict:
    try:
        cfg = json.loads(p.read_text())
    except (OSError, ValueError) as e:
        raise LoadError(f"{p} is not valid JSON: {e}") from e
    if not isinstance(cfg, dict):
        raise LoadError(f"{p} does not hold a JSON object")
    return cfg


def _read_safetensors(files: list[Path], keep=None) -> dict[str, torch.Tensor]:
    out = {}
    for f in files:
        try:
            sd = load_file(str(f))
        except Exception as e:  # truncated / corrupt file
            raise LoadError(f"{f} could not be read ({type(e).__name__}: {e})") from e
        out.update({k: v for k, v in sd.items() if keep is None or keep(k)})
    return out


def _read(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config, adapter tensors) from an mk.save folder or a save_pretrained folder of an injected model."""
    if not path.is_dir():
        raise LoadError(f"path {str(path)!r} is not a folder")
    if (path / CONFIG_NAME).is_file() or not (path / HF_CONFIG_NAME).is_file():
        for p in (path / CONFIG_NAME, path / WEIGHTS_NAME):
            if not p.is_file():
                raise LoadError(f"path {str(path)!r} has no {p.name}")
        cfg = _read_json(path / CONFIG_NAME)
        if cfg.get("format_version") not in (1, FORMAT_VERSION):
            raise LoadError(f"{path / CONFIG_NAME}: unsupported format_version {cfg.get('format_version')!r}")
        tensors = _read_safetensors([path / WEIGHTS_NAME])
    else:  # model.save_pretrained(path) of an injected model: config.json has a "moecl" entry
        cfg = _read_json(path / HF_CONFIG_NAME).get("moecl")
        if not isinstance(cfg, dict):
            raise LoadError(f"{path / HF_CONFIG_NAME} has no 'moecl' entry: this folder holds no MoE-CL adapter")
        index = path / "model.safetensors.index.json"
        files = (sorted({path / f for f in _read_json(index).get("weight_map", {}).values()}) if index.is_file()
                 else [path / "model.safetensors"])
        for f in files:
            if not f.is_file():
                raise LoadError(f"path {str(path)!r} has no {f.name}")
        saved = tuple(f"{m}." for m in cfg.get("modules_to_save") or [])
        tensors = _read_safetensors(files, keep=lambda k: _ADAPTER_KEY.search(k) is not None or k.startswith(saved))
    missing = [k for k in _INJECT_KEYS + ("modules",) if k not in cfg]
    if missing:
        raise LoadError(f"the saved config in {str(path)!r} lacks keys {missing}")
    cfg.setdefault("level", "linear")  # saved before the FFN level existed
    cfg.setdefault("modules_to_save", [])  # saved before modules_to_save existed
    cfg.setdefault("merged", {})
    if cfg["level"] not in LEVELS:
        raise LoadError(f"the saved config in {str(path)!r} has level={cfg['level']!r}; known levels: {list(LEVELS)}")
    return cfg, tensors


def load(model: nn.Module, path: Union[str, os.PathLike], strict_config: bool = True,
         trainable: bool = False) -> nn.Module:
    """Load a saved adapter into ``model`` (an ``mk.save`` folder, or the ``save_pretrained``
    folder of an injected model).

    A plain (not yet injected) model is injected with the saved config first, at exactly the
    saved modules; an injected model must have the same modules, rank, task count and gate
    setting. Everything is validated before the model changes; on error (:class:`LoadError`)
    it is untouched. The saved ``modules_to_save`` are loaded, and saved merges redone.

    ``trainable=False`` (PEFT's default, for inference): the model is put in eval mode and every
    adapter parameter (and module to save) is frozen. ``trainable=True``: they are all trainable,
    as after ``inject``, and the train/eval mode is left as it is.
    """
    if not isinstance(trainable, bool):
        raise ValueError(f"trainable must be True or False, got {trainable!r}")
    d = Path(path)
    cfg, tensors = _read(d)
    modules, level = list(cfg["modules"]), cfg["level"]
    r, E, gate = int(cfg["r"]), int(cfg["num_tasks"]), bool(cfg["gate"])
    merged = _check_merged(cfg, d)
    if is_injected(model):
        busy = {n: m.merged_tasks for n, m in moe_layers(model).items() if m.merged_tasks}
        if busy:
            raise LoadError(f"the model has task experts merged into its base weights ({busy}): load into a model "
                            "whose base weights are the plain ones (unmerge_task them first, or a fresh model)")
        if sorted(cfg["modules_to_save"]) != modules_to_save(model):
            raise LoadError(f"saved modules_to_save {cfg['modules_to_save']} differ from the model's "
                            f"{modules_to_save(model)}")
        have = _config(model)
        diffs = {k: (cfg[k], have[k]) for k in ("level", "num_tasks", "r", "gate", "rslora") if cfg[k] != have[k]}
        if strict_config:
            diffs.update({k: (cfg[k], have[k]) for k in ("alpha",) if cfg[k] != have[k]})
        if diffs:
            raise LoadError(f"saved config differs from the model's (saved, model): {diffs}")
        if sorted(moe_layers(model)) != sorted(modules):
            raise LoadError(
                f"saved modules differ from the model's injected modules: only saved {sorted(set(modules) - set(moe_layers(model)))[:5]}, "
                f"only in model {sorted(set(moe_layers(model)) - set(modules))[:5]}"
            )
        targets = dict(_adapter_tensors(model), **saved_module_parameters(model))
        expected = {k: tuple(p.shape) for k, p in targets.items()}
    else:
        exact = "|".join(re.escape(m) for m in modules) or "(?!)"
        try:
            if level == "linear":
                find_targets(model, exact)
            else:
                found = {name for name, _, _ in find_mlp_targets(model, exact)}
                if found != set(modules):
                    raise ValueError(f"no MLP at saved modules {sorted(set(modules) - found)[:5]}")
        except (ValueError, TypeError) as e:
            raise LoadError(f"the model does not fit the saved modules: {e}") from e
        if level == "linear":
            absent = [m for m in modules if not (isinstance(_get(model, m), nn.Linear) or is_conv1d(_get(model, m)))]
            if absent:
                raise LoadError(f"the model has no nn.Linear (or Conv1D) at saved modules {absent[:5]}")
        targets = None
        # expected keys and shapes, computed without changing the model
        expected = {}
        for name in modules:
            expected.update(_MODULE_CLASS[level].expected_adapters(model, name, r, E, gate))
        for m in cfg["modules_to_save"]:
            if not isinstance(_get(model, m), nn.Module):
                raise LoadError(f"the model has no module {m!r} (one of the saved modules_to_save)")
            expected.update({f"{m}.{n}": tuple(p.shape) for n, p in model.get_submodule(m).named_parameters()})
    tensors, snaps = io_snapshots.split(tensors)
    frozen = io_snapshots.check(snaps, expected, modules, E, LoadError)
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing or extra:
        raise LoadError(f"{d}: missing tensors {missing[:5]}, unexpected tensors {extra[:5]}")
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
        inject(model, **dict({k: cfg[k] for k in _INJECT_KEYS}, target_modules=exact), level=level,
               modules_to_save="|".join(re.escape(m) for m in cfg["modules_to_save"]) or None)  # exactly these
        model.__dict__[CONFIG_ATTR]["target_modules"] = cfg["target_modules"]
        targets = dict(_adapter_tensors(model), **saved_module_parameters(model))
    with torch.no_grad():
        for k, p in targets.items():
            p.copy_(tensors[k].to(dtype=p.dtype, device=p.device))
    io_snapshots.apply(model, snaps, frozen)
    layers = moe_layers(model)
    for layer in layers.values():
        layer.invalidate_cache()
    for name, tasks in merged.items():
        for k in tasks:
            layers[name].merge_task(k)
    for p in targets.values():
        p.requires_grad_(trainable)
    if not trainable:
        model.eval()
    return model


def _check_merged(cfg: dict, d: Path) -> dict[str, list[int]]:
    """The saved merges ({module: [task, ...]}), checked against the saved config."""
    merged = cfg["merged"]
    ok = isinstance(merged, dict) and all(
        m in cfg["modules"] and isinstance(ks, list) and all(isinstance(k, int) and 0 <= k < int(cfg["num_tasks"])
                                                              for k in ks) for m, ks in merged.items())
    if not ok:
        raise LoadError(f"{d / CONFIG_NAME}: 'merged' must map saved modules to lists of task indices, got {merged!r}")
    if merged and cfg["gate"]:
        raise LoadError(f"{d / CONFIG_NAME}: records merged tasks for a gated adapter (merge needs gate=False)")
    return merged


def _get(model: nn.Module, name: str):
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None

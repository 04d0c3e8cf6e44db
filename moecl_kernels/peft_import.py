"""``import_peft_lora``: a PEFT LoRA adapter becomes task expert k.

PEFT computes ``s_p * (x A_p^T) B_p^T`` with ``s_p = alpha / r_p`` (``/ sqrt(r_p)`` for
rsLoRA, per-module ``rank_pattern`` / ``alpha_pattern``). Expert k gets ``A_p`` in its
first ``r_p`` rows (rest zero) and ``B_p * s_p / s`` in its first ``r_p`` columns, where
``s`` is the layer's own scaling, so ``s * (x A_k^T) B_k^T`` is PEFT's term. Injected
projections the adapter does not cover get ``B_k = 0`` (no contribution). Everything is
validated before the model changes. Both levels alike: PEFT names each ``nn.Linear`` it
adapts, and so does every LoRA projection of an injected model (a ``FusedMoELoRALinear``, or
a projection of a ``FusedMoELoRAMLP``, which keeps the Linear's name).

The model then computes PEFT's output exactly only where nothing else adds to it: layers
without a gate (``gate=True`` scales the expert by beta_task and adds beta_shared times the
shared expert) and a shared expert that is still zero. Otherwise the import warns.
"""

from __future__ import annotations

import math
import operator
import os
import re
import warnings
from pathlib import Path
from typing import Any, Optional, Union

import torch
import torch.nn as nn

from .experts import LoRAProjection
from .integration import moe_layers, num_tasks
from .io import _read_json, _read_safetensors

_PREFIX = "base_model.model."


def _pattern_value(patterns: dict, name: str, default):
    for key, val in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", name):
            return val
    return default


def _from_dir(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    cfg_file = path / "adapter_config.json"
    if not cfg_file.is_file():
        raise ValueError(f"peft_dir_or_model {str(path)!r} has no adapter_config.json")
    cfg = _read_json(cfg_file)
    _check_config(cfg, str(cfg_file))
    st, binf = path / "adapter_model.safetensors", path / "adapter_model.bin"
    if st.is_file():
        sd = _read_safetensors([st])
    elif binf.is_file():
        try:
            sd = torch.load(str(binf), map_location="cpu", weights_only=True)
        except Exception as e:  # truncated / corrupt file
            raise ValueError(f"{binf} could not be read ({type(e).__name__}: {e})") from e
    else:
        raise ValueError(f"peft_dir_or_model {str(path)!r} has no adapter_model.safetensors or adapter_model.bin")
    return cfg, sd


def _check_config(cfg: dict, where: str) -> None:
    """The LoRA settings of an adapter config have the types PEFT writes; ValueError naming ``where`` and the key."""
    def number(v, integer=False):
        return not isinstance(v, bool) and isinstance(v, int if integer else (int, float)) and v > 0

    checks = (("r", lambda v: number(v, True), "a positive integer"), ("lora_alpha", number, "a positive number"),
              ("use_rslora", lambda v: isinstance(v, bool), "true or false"),
              ("rank_pattern", lambda v: isinstance(v, dict) and all(number(x, True) for x in v.values()),
               "an object of positive integers"),
              ("alpha_pattern", lambda v: isinstance(v, dict) and all(number(x) for x in v.values()),
               "an object of positive numbers"))
    for key, ok, what in checks:
        if cfg.get(key) is not None and not ok(cfg[key]):
            raise ValueError(f"{where}: {key} must be {what}, got {cfg[key]!r}")


def _from_model(peft_model: nn.Module, adapter_name: str) -> tuple[dict, dict[str, torch.Tensor]]:
    from peft.utils import get_peft_model_state_dict

    pcfg = peft_model.peft_config.get(adapter_name) if hasattr(peft_model, "peft_config") else None
    if pcfg is None:
        raise ValueError(f"peft_dir_or_model has no adapter named {adapter_name!r}")
    cfg = pcfg.to_dict()
    sd = get_peft_model_state_dict(peft_model, adapter_name=adapter_name)
    return cfg, {k: v.detach() for k, v in sd.items()}


def import_peft_lora(
    model: nn.Module, peft_dir_or_model: Union[str, os.PathLike, Any], task: int, adapter_name: str = "default"
) -> list[str]:
    """Copy a PEFT LoRA adapter (a saved adapter folder or a ``PeftModel``) into task expert ``task``.

    Returns the names of the injected modules the adapter covered.
    """
    E = num_tasks(model)
    try:
        task = operator.index(task)
    except TypeError:
        raise ValueError(f"task must be an integer, got {task!r}") from None
    if not 0 <= task < E:
        raise ValueError(f"task={task} is out of range for num_tasks={E}")
    if isinstance(peft_dir_or_model, (str, os.PathLike)):
        cfg, sd = _from_dir(Path(peft_dir_or_model))
    elif isinstance(peft_dir_or_model, nn.Module):
        cfg, sd = _from_model(peft_dir_or_model, adapter_name)
    else:
        raise TypeError(f"peft_dir_or_model must be a folder path or a PeftModel, got {type(peft_dir_or_model).__name__}")

    peft_type = str(cfg.get("peft_type", "LORA")).upper().rsplit(".", 1)[-1]
    if peft_type != "LORA":
        raise ValueError(f"peft_dir_or_model is a {peft_type} adapter; only LoRA is supported")
    for key, ok, what in (
        ("use_dora", lambda v: not v, "DoRA"),
        ("fan_in_fan_out", lambda v: not v, "fan_in_fan_out (Conv1D) layers"),
        ("bias", lambda v: v in (None, "none"), "LoRA biases"),
    ):
        if not ok(cfg.get(key)):
            raise ValueError(f"peft_dir_or_model uses {what} ({key}={cfg.get(key)!r}), which an expert cannot represent")
    if cfg.get("modules_to_save"):
        warnings.warn(f"import_peft_lora ignores modules_to_save={cfg['modules_to_save']} (not LoRA weights)", stacklevel=2)

    layers = {n: m for n, m in model.named_modules() if isinstance(m, LoRAProjection)}  # the LoRA projections
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in sd.items():
        m = re.match(r"^(.*)\.lora_([AB])(?:\.[^.]+)?\.weight$", key)
        if m is None:
            continue
        mod = m.group(1)
        if mod.startswith(_PREFIX):
            mod = mod[len(_PREFIX):]
        hit = mod if mod in layers else next((n for n in layers if mod.endswith("." + n) or n.endswith("." + mod)), None)
        if hit is None:
            raise ValueError(
                f"the PEFT adapter adapts module {mod!r}, which is not an injected module of the model; "
                f"inject it too (target_modules) before importing"
            )
        pairs.setdefault(hit, {})[m.group(2)] = t
    if not pairs:
        raise ValueError("peft_dir_or_model holds no LoRA weights (no '*.lora_A.weight' keys)")

    # validate every module and compute the new expert weights before changing anything
    new: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for name, ab in pairs.items():
        if set(ab) != {"A", "B"}:
            raise ValueError(f"PEFT adapter has lora_A without lora_B (or vice versa) for module {name!r}")
        layer = layers[name]
        A_p, B_p = ab["A"].to(torch.float64), ab["B"].to(torch.float64)
        r_p = A_p.shape[0]
        if tuple(A_p.shape) != (r_p, layer.in_features) or tuple(B_p.shape) != (layer.out_features, r_p):
            raise ValueError(
                f"PEFT weights for module {name!r} have shapes A{tuple(A_p.shape)} B{tuple(B_p.shape)}, "
                f"expected A[r, {layer.in_features}] B[{layer.out_features}, r]"
            )
        if r_p > layer.r:
            raise ValueError(f"PEFT adapter has rank {r_p} for module {name!r} but the layer has r={layer.r}; inject with r >= {r_p}")
        r_cfg = _pattern_value(cfg.get("rank_pattern"), name, cfg.get("r", r_p))
        alpha = float(_pattern_value(cfg.get("alpha_pattern"), name, cfg.get("lora_alpha", r_cfg)))
        s_p = alpha / (math.sqrt(r_p) if cfg.get("use_rslora") else r_p)
        A = torch.zeros(layer.r, layer.in_features, dtype=torch.float64)
        B = torch.zeros(layer.out_features, layer.r, dtype=torch.float64)
        A[:r_p] = A_p
        B[:, :r_p] = B_p * (s_p / layer.scaling)
        new[name] = (A, B)

    k = int(task)
    with torch.no_grad():
        for name, layer in layers.items():
            if name in new:
                A, B = new[name]
                layer.lora_task_A[k].copy_(A.to(layer.lora_task_A[k].dtype))
                layer.lora_task_B[k].copy_(B.to(layer.lora_task_B[k].dtype))
            else:
                layer.lora_task_B[k].zero_()
            layer.drop_stack_cache()
    gated = sorted(n for n, layer in moe_layers(model).items() if layer.gate)
    shared = sorted(n for n, layer in layers.items() if bool(layer.lora_shared_B.detach().any()))
    if gated or shared:
        why = []
        if gated:
            why.append(f"{len(gated)} layers have a gate (beta_task scales the expert; inject with gate=False)")
        if shared:
            why.append(f"{len(shared)} layers have a non-zero shared expert (it adds to every task)")
        warnings.warn(f"import_peft_lora: expert {k} holds the PEFT adapter exactly, but the model's output differs "
                      f"from PEFT's: {'; '.join(why)}", stacklevel=2)
    return sorted(new)

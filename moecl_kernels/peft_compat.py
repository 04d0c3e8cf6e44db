"""PEFT's user verbs for injected models: ``print_trainable_parameters``, ``disable_adapters``,
``unload``, ``merge_and_unload``, and ``modules_to_save`` (modules outside the adapters that are
trained, saved and loaded with them, e.g. a classifier head).

These act on a model through ``integration`` (its injected modules, its injection config) and on
the modules through their protocol (``experts.MoEModule``); the layers know nothing of them except
the one check ``adapters_off.disabled`` at the top of their forward.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional, Sequence, Union

import torch.nn as nn

from .adapters_off import disabling
from .integration import CONFIG_ATTR, GenerateWithTasks, _layers, matches, num_tasks
from .layer import FusedMoELoRALinear
from .routing import PooledResults, close_hook, open_hook, structure_changed


# --------------------------------------------------------------------------- modules_to_save
def find_modules_to_save(model: nn.Module, names: Union[str, Sequence[str], None]) -> list[str]:
    """Full names of the modules ``names`` selects (PEFT's rule: name suffixes, or one regex); raises
    naming a name that matches nothing, a module without parameters, or one inside an injected module."""
    if names is None:
        return []
    if not isinstance(names, str):
        names = list(names)
        if not all(isinstance(n, str) and n for n in names):
            raise ValueError(f"modules_to_save must be a list of module names or a regex, got {names!r}")
    from .experts import MoEModule

    found, hit = [], set()
    for name, mod in model.named_modules():
        if not name or not matches(name, names):
            continue
        if any(name == f or name.startswith(f + ".") for f in found):
            continue  # inside a module already selected
        if isinstance(mod, MoEModule) or any(isinstance(m, MoEModule) for m in mod.modules()):
            raise ValueError(f"modules_to_save: {name!r} is or contains an injected module; name a module outside "
                             "the adapters (e.g. a classification head)")
        if not any(True for _ in mod.parameters()):
            raise ValueError(f"modules_to_save: module {name!r} has no parameters")
        found.append(name)
        hit.update([names] if isinstance(names, str) else [t for t in names if matches(name, [t])])
    missing = [t for t in ([names] if isinstance(names, str) else names) if t not in hit]
    if missing:
        raise ValueError(f"modules_to_save names {missing} that match no module of {type(model).__name__}")
    return found


def modules_to_save(model: nn.Module) -> list[str]:
    """The ``modules_to_save`` of every ``inject`` inside ``model``, by their names in ``model``."""
    out = []
    for prefix, m in model.named_modules():
        cfg = m.__dict__.get(CONFIG_ATTR)
        if isinstance(cfg, dict):
            out += [f"{prefix}.{n}" if prefix else n for n in cfg.get("modules_to_save") or []]
    return sorted(out)


def saved_module_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The parameters of the ``modules_to_save`` of ``model``, by their names in ``model``."""
    out = {}
    for name in modules_to_save(model):
        out.update({f"{name}.{n}": p for n, p in model.get_submodule(name).named_parameters()})
    return out


# --------------------------------------------------------------------------- PEFT verbs
def print_trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """Print PEFT's line ``trainable params: N || all params: M || trainable%: P``; returns (N, M)."""
    seen, trainable, total = set(), 0, 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / max(total, 1):.4f}")
    return trainable, total


@contextlib.contextmanager
def disable_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the block every injected module of ``model`` computes its wrapped base module exactly:
    no shared expert, no task expert, no gate, no routing needed (PEFT's ``disable_adapter``)."""
    with disabling(_layers(model).values()):
        yield model


def _remove_hooks(model: nn.Module) -> None:
    for m in model.modules():
        for hid, h in list(m._forward_pre_hooks.items()):
            if h is open_hook:
                del m._forward_pre_hooks[hid]
                m._forward_pre_hooks_with_kwargs.pop(hid, None)
        for hid, h in list(m._forward_hooks.items()):
            if h is close_hook:
                del m._forward_hooks[hid]
                m._forward_hooks_always_called.pop(hid, None)
                m._forward_hooks_with_kwargs.pop(hid, None)


def _set(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def _restore_mlp(model: nn.Module, name: str, mlp) -> None:
    """Put back the MLP a ``FusedMoELoRAMLP`` wrapped, its projections on the current base weights."""
    original = mlp._original
    holders = {role: mlp.projection(role) for role in mlp._paths}
    if mlp.bert:  # the layer's intermediate and output.dense
        intermediate, down = original
        intermediate.dense.weight, intermediate.dense.bias = holders["up"].weight, holders["up"].bias
        down.weight, down.bias = holders["down"].weight, holders["down"].bias
        layer_name = name.rpartition(".")[0]
        layer = model.get_submodule(layer_name) if layer_name else model
        layer.intermediate, layer.output.dense = intermediate, down
        return
    root = original[0]
    for role, path in mlp._paths.items():
        lin = root.get_submodule(path)
        lin.weight, lin.bias = holders[role].weight, holders[role].bias
    root.train(mlp.training)
    if name:
        _set(model, name, root)


def unload(model: nn.Module) -> nn.Module:
    """The plain model back, in place: every injected module replaced by the module it wrapped (on
    the current base weights, merged deltas included), the routing hooks and the injection config
    removed. The adapters are dropped (``mk.save`` them first to keep them). Returns ``model``."""
    layers = _layers(model)
    if "" in layers:
        raise ValueError("unload: the model is itself an injected module; use its to_linear() or keep the module")
    for name, layer in layers.items():
        if isinstance(layer, FusedMoELoRALinear):
            lin = layer.to_linear()
            lin.train(layer.training)
            _set(model, name, lin)
        else:
            _restore_mlp(model, name, layer)
    _remove_hooks(model)
    for m in model.modules():
        m.__dict__.pop(CONFIG_ATTR, None)
        m.__dict__.pop(PooledResults.ATTR, None)
        if isinstance(m.__dict__.get("generate"), GenerateWithTasks):
            del m.__dict__["generate"]
        cfg = getattr(m, "config", None)
        if cfg is not None and hasattr(cfg, "moecl"):
            del cfg.moecl
    structure_changed()
    return model


def merge_and_unload(model: nn.Module, task: Optional[int] = None) -> nn.Module:
    """Fold the shared expert and task expert ``task`` (None: the shared expert only, what a token
    without a task gets) into the base weights, then :func:`unload`: the plain model computes what
    the injected one computed for tokens routed to ``task``. Needs ``gate=False`` (a gated model mixes
    the experts with per-token weights no single weight matrix reproduces)."""
    layers = _layers(model)
    gated = [n for n, layer in layers.items() if layer.gate]
    if gated:
        raise ValueError(f"merge_and_unload needs gate=False: module {gated[0]!r} has a gate, which mixes the experts "
                         "with per-token weights (beta depends on x) that no merged weight reproduces; keep the model "
                         "injected and route with task_ids=, or mk.unload(model) for the base model")
    if task is not None:
        num_tasks(model)  # refuse layers that disagree
        task = next(iter(layers.values())).check_task(task, "merge_and_unload")
    for layer in layers.values():
        if task is not None and task not in layer.merged_tasks:
            layer.merge_task(task)
        for proj in layer.lora_projections():
            proj.merge_lora(proj.lora_shared_A, proj.lora_shared_B)
    return unload(model)

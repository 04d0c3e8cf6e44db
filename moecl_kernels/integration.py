"""Hugging Face integration: ``inject``, ``use_tasks``, ``set_trainable`` and friends.

``inject`` replaces the targeted ``nn.Linear`` modules by :class:`FusedMoELoRALinear`
(``level="linear"``, docs/spec.md §1.1) or the model's MLPs by :class:`FusedMoELoRAMLP`
(``level="ffn"``, §1.3), and installs two hooks on every module that contains one (the model and its submodules): a
forward pre-hook that takes ``task_ids=`` out of the call and opens a routing context for
that call, and a forward hook, always called, that closes it. The layers find the routing
in force through ``routing.context_for`` (see ``routing/context.py``); nothing about
routing is stored on the model. The hooks are plain functions, so an injected model
deep-copies, pickles and ``torch.save``s like any module.

Everything that acts on "the model" takes any module: it acts on the routed layers inside it,
through the protocol of ``experts.MoEModule`` (both levels alike).
"""

from __future__ import annotations

import contextlib
import operator
import re
from typing import Iterable, Iterator, Optional, Sequence, Union

import torch.nn as nn
from torch import Tensor

from . import snapshots
from .backends import get_backend
from .experts import MoEModule, check_args, check_flags, check_rank, is_conv1d, projection_dims
from .layer import FusedMoELoRALinear
from .mlp import LOOKED_FOR, FusedMoELoRAMLP, MLPLayout, find_mlp, mlp_layout, routed_name
from .routing import (PooledResults, RoutedModule, RoutingContext, TaskIds, close_hook, open_hook, pop, push,
                      routed_modules, structure_changed)

CONFIG_ATTR = "_moecl_config"  # the inject() arguments, on the module inject() was called on
LEVELS = ("linear", "ffn")
LINEAR_TARGETS = ("gate_proj", "up_proj", "down_proj")  # inject(level="linear")'s default target_modules
ALL_LINEAR = "all-linear"  # PEFT's shorthand: every Linear of the blocks


def moe_layers(model: nn.Module) -> dict[str, MoEModule]:
    """Every injected module inside ``model`` (``FusedMoELoRALinear`` or ``FusedMoELoRAMLP``),
    by its module name relative to ``model``."""
    return {n: m for n, m in model.named_modules() if isinstance(m, MoEModule)}


def is_injected(model: nn.Module) -> bool:
    """True if ``model`` contains routed (MoE-CL) layers."""
    return any(isinstance(m, RoutedModule) for m in model.modules())


def _layers(model: nn.Module) -> dict[str, MoEModule]:
    layers = moe_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} contains no MoE-CL layers: prepare it with mk.inject(model, ...) first")
    return layers


def num_tasks(model: nn.Module) -> int:
    """The task count shared by every injected layer of ``model``."""
    counts = {layer.num_tasks for layer in _layers(model).values()}
    if len(counts) != 1:
        raise ValueError(f"the injected layers of this model disagree on num_tasks: {sorted(counts)}")
    return counts.pop()


# --------------------------------------------------------------------------- target matching
def matches(name: str, targets: Union[str, Sequence[str]]) -> bool:
    """PEFT's rule: one string is a regex on the full module name; a list holds name suffixes
    (``"up_proj"`` matches ``model.layers.0.mlp.up_proj``)."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def find_targets(model: nn.Module, target_modules: Union[str, Sequence[str]]) -> list[str]:
    """Names of the modules ``inject`` would replace; raises on unsupported module types and
    on a listed name that matches no ``nn.Linear``."""
    if target_modules == ALL_LINEAR:
        return _all_linear(model)
    target_modules = _check_target_list(target_modules)
    names, hit = [], set()
    for name, mod in model.named_modules():
        if not name or not matches(name, target_modules):
            continue
        if isinstance(mod, MoEModule):
            raise ValueError(f"module {name!r} is already a {type(mod).__name__} (model injected twice?)")
        if isinstance(mod, nn.Linear) or is_conv1d(mod):  # a GPT-2 Conv1D keeps its [in, out] weight
            names.append(name)
            if not isinstance(target_modules, str):
                hit.update(t for t in target_modules if matches(name, [t]))
        elif any(isinstance(c, nn.Linear) for c in mod.children()):
            continue  # a container whose name matches (e.g. 'mlp'); its Linear children are matched by name
        else:
            raise TypeError(
                f"target_modules matched {name!r} of type {type(mod).__name__}; only torch.nn.Linear is supported"
            )
    linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear) or is_conv1d(m)})
    if not names:
        raise ValueError(f"target_modules={target_modules!r} matched no nn.Linear; the model's Linear names are {linear}")
    if not isinstance(target_modules, str) and len(hit) < len(target_modules):
        missing = [t for t in target_modules if t not in hit]
        raise ValueError(f"target_modules names {missing} that match no nn.Linear of the model; its Linear names are {linear}")
    return names


def _all_linear(model: nn.Module) -> list[str]:
    """PEFT's ``"all-linear"``: every ``nn.Linear`` inside the model's numbered blocks (a module list),
    so not the output head, a pooler or a classifier."""
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    names = [n for n, m in model.named_modules() if (isinstance(m, nn.Linear) or is_conv1d(m)) and m is not head
             and any(part.isdigit() for part in n.split("."))]
    if not names:
        raise ValueError(f"target_modules='all-linear' found no nn.Linear inside numbered blocks of "
                         f"{type(model).__name__}; name the modules")
    return names


def _check_target_list(target_modules) -> Union[str, list]:
    if isinstance(target_modules, str):
        return target_modules
    target_modules = list(target_modules)
    if not target_modules or not all(isinstance(t, str) and t for t in target_modules):
        raise ValueError(f"target_modules must be a regex or a non-empty list of module names, got {target_modules!r}")
    return target_modules


def find_mlp_targets(model: nn.Module, target_modules=None) -> list[tuple[str, str, MLPLayout]]:
    """(name of the FusedMoELoRAMLP, name of the MLP it wraps, layout) of every MLP that
    ``inject(level="ffn")`` wraps: with ``target_modules=None`` every MLP the architecture has;
    else the modules named (PEFT's rule, as for the linear level), where a named projection
    stands for the MLP around it. Raises naming a module that is not an MLP, and when none is found."""
    found: dict[str, tuple[str, str, MLPLayout]] = {}
    if target_modules is None:
        for name, mod in model.named_modules():
            if isinstance(mod, MoEModule):
                raise ValueError(f"module {name!r} is already a {type(mod).__name__} (model injected twice?)")
            if any(name.startswith(root + ".") for root in found) or not name:
                continue
            layout = mlp_layout(mod, name, strict=False)
            if layout is not None:
                found[name] = (routed_name(name, layout), name, layout)
        if not found:
            raise ValueError(f"inject(level='ffn') found no MLP in {type(model).__name__}: it looks for {LOOKED_FOR}; "
                             "name the MLP modules with target_modules")
        return list(found.values())
    target_modules = _check_target_list(target_modules)
    hit = set()
    for name, mod in model.named_modules():
        if not name or not matches(name, target_modules):
            continue
        if not isinstance(target_modules, str):
            hit.update(t for t in target_modules if matches(name, [t]))
        if any(name.startswith(root + ".") for root in found):
            continue
        if isinstance(mod, MoEModule):
            raise ValueError(f"module {name!r} is already a {type(mod).__name__} (model injected twice?)")
        at = name
        if isinstance(mod, nn.Linear):  # a projection names the MLP around it
            parents = [name.rsplit(".", k)[0] for k in (1, 2) if name.count(".") >= k]
            at = next((p for p in parents if _is_mlp(model, p)), name)
        root, layout = find_mlp(model, at)
        found.setdefault(root, (routed_name(root, layout), root, layout))
    if not found:
        raise ValueError(f"target_modules={target_modules!r} matched no module of the model")
    if not isinstance(target_modules, str) and len(hit) < len(target_modules):
        missing = [t for t in target_modules if t not in hit]
        raise ValueError(f"target_modules names {missing} that match no module of the model")
    return list(found.values())


def _is_mlp(model: nn.Module, name: str) -> bool:
    try:
        find_mlp(model, name)
    except (ValueError, AttributeError):
        return False
    return True


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def install_hooks(model: nn.Module) -> None:
    """Routing hooks on ``model`` and every submodule that contains a routed layer (idempotent)."""
    for m in model.modules():
        if isinstance(m, RoutedModule) or not routed_modules(m):
            continue
        if not any(h is open_hook for h in m._forward_pre_hooks.values()):
            m.register_forward_pre_hook(open_hook, with_kwargs=True)
            m.register_forward_hook(close_hook, always_call=True)


def inject(
    model: nn.Module,
    target_modules: Union[str, Sequence[str], None] = None,
    num_tasks: int = 1,
    r: int = 8,
    alpha: float = 16.0,
    dropout: float = 0.05,
    gate: bool = True,
    rslora: bool = False,
    backend: Optional[str] = None,
    deterministic: bool = False,
    level: str = "linear",
    modules_to_save: Union[str, Sequence[str], None] = None,
) -> nn.Module:
    """Inject MoE-CL experts into ``model`` (in place) and return it.

    ``level="linear"`` (docs/spec.md §1.1): the targeted ``nn.Linear`` modules become
    :class:`FusedMoELoRALinear`, each mixing its own experts (``target_modules`` default:
    gate_proj, up_proj, down_proj). ``level="ffn"`` (§1.3, the paper's): every MLP becomes a
    :class:`FusedMoELoRAMLP` whose experts are whole MLPs (``target_modules`` default: every MLP
    the architecture has; names may be MLPs or their projections).

    ``target_modules``: a list of module-name suffixes (``"up_proj"`` matches
    ``model.layers.0.mlp.up_proj``; every listed name must match) or one regex matched
    against full names. All non-MoE parameters are frozen; shared experts, task experts and
    gates are trainable (narrow that with :func:`set_trainable`). Afterwards
    ``model(..., task_ids=t)`` -- or any submodule's call with ``task_ids=`` -- routes each
    sequence to its task expert. ``target_modules="all-linear"`` (linear level): every
    ``nn.Linear`` inside the model's numbered blocks (not the output head).

    ``modules_to_save`` (PEFT's meaning): modules outside the adapters, e.g. a classifier head,
    that stay trainable and that ``mk.save``/``mk.load`` store and restore with the adapters.
    """
    if level not in LEVELS:
        raise ValueError(f"level={level!r} must be one of {list(LEVELS)}")
    if is_injected(model):
        raise ValueError("model is already injected; use mk.add_tasks(model, n) to grow it")
    # validate everything before changing anything
    if level == "linear":
        names = find_targets(model, LINEAR_TARGETS if target_modules is None else target_modules)
    else:
        mlps = find_mlp_targets(model, None if target_modules == ALL_LINEAR else target_modules)
        if any(not root and not layout.bert for _, root, layout in mlps):
            raise ValueError("model is itself an MLP: wrap it with mk.FusedMoELoRAMLP(model, ...)")
        names = [name for name, _, _ in mlps]
    num_tasks, r, alpha, dropout = check_args(num_tasks, r, dropout, alpha)
    gate, rslora, deterministic = check_flags(gate=gate, rslora=rslora, deterministic=deterministic)
    for name in names if level == "linear" else []:
        check_rank(r, *projection_dims(model.get_submodule(name))[:2])
    for _, _, layout in mlps if level == "ffn" else []:
        for lin in layout.linears.values():
            check_rank(r, lin.in_features, lin.out_features)
    if backend not in (None, "auto"):  # an explicit "auto" is kept: it wins over $MOECL_BACKEND
        _check_backend_name(backend)
    from .peft_compat import find_modules_to_save

    saved = find_modules_to_save(model, modules_to_save)
    for p in model.parameters():
        p.requires_grad_(False)
    settings = (num_tasks, r, alpha, dropout, gate, rslora, backend, deterministic)
    if level == "linear":
        for name in names:
            lin = model.get_submodule(name)
            layer = FusedMoELoRALinear(lin, *settings)
            layer.train(lin.training)  # keep the model's train/eval mode
            _set_submodule(model, name, layer)
    else:
        for _, root, layout in mlps:
            mlp = FusedMoELoRAMLP(layout.root, *settings, name=root)  # a BERT-style layer is changed in place
            if not layout.bert:
                _set_submodule(model, root, mlp)
    structure_changed()
    install_hooks(model)
    if target_modules is None:
        target_modules = list(LINEAR_TARGETS) if level == "linear" else None
    for name in saved:
        model.get_submodule(name).requires_grad_(True)
    cfg = dict(target_modules=list(target_modules) if isinstance(target_modules, (list, tuple)) else target_modules,
               num_tasks=num_tasks, r=r, alpha=alpha, dropout=dropout, gate=bool(gate), rslora=bool(rslora),
               level=level, modules_to_save=saved)
    setattr(model, CONFIG_ATTR, cfg)
    if callable(getattr(type(model), "generate", None)):
        model.__dict__["generate"] = GenerateWithTasks(model)  # generate(..., task_ids=t) routes like use_tasks
    hf_config = getattr(model, "config", None)
    if hf_config is not None and hasattr(hf_config, "to_dict"):
        hf_config.moecl = dict(cfg, modules=sorted(names))  # recorded by save_pretrained (mk.load reads it)
    return model


def add_tasks(model: nn.Module, n: int) -> int:
    """Grow every injected layer by ``n`` task experts (trained experts are kept; the new ones
    are frozen if ``set_trainable`` had frozen some). Returns the new count."""
    layers = _layers(model)
    num_tasks(model)  # refuse a model whose layers disagree
    for layer in layers.values():
        layer.add_tasks(n)
    count = num_tasks(model)
    for m in model.modules():
        for cfg in (m.__dict__.get(CONFIG_ATTR), getattr(getattr(m, "config", None), "moecl", None)):
            if isinstance(cfg, dict):
                cfg["num_tasks"] = count
    return count


@contextlib.contextmanager
def use_tasks(model: nn.Module, task_ids: TaskIds, attention_mask: Optional[Tensor] = None) -> Iterator[nn.Module]:
    """Route every forward of ``model`` (or of its submodules) inside the block with ``task_ids``
    (for ``generate()`` and custom loops).

    Per-sequence ids [B] broadcast over whatever sequence length each forward has (prefill,
    then one token per decode step, the encoder of an encoder-decoder) and over k*B rows when
    generate() expands each sequence (beams, several return sequences).
    """
    _layers(model)
    ctx = push(RoutingContext(model, task_ids, attention_mask, expand_batch=True))
    try:
        yield model
    finally:
        pop(ctx)
        if ctx.pooled or PooledResults.ATTR in model.__dict__:
            PooledResults.of(model).set(ctx.pooled)


class GenerateWithTasks:
    """``model.generate(..., task_ids=t)`` on an injected Hugging Face model: the class's own
    ``generate`` inside ``with mk.use_tasks(model, t, attention_mask=...)`` (without ``task_ids``
    it is the class's ``generate`` unchanged). Installed by ``inject`` on the model it injects
    (an instance attribute: it copies and pickles with the model), removed by ``mk.unload``."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __call__(self, *args, task_ids: Optional[TaskIds] = None, **kwargs):
        generate = type(self.model).generate.__get__(self.model)
        if task_ids is None:
            return generate(*args, **kwargs)
        with use_tasks(self.model, task_ids, attention_mask=kwargs.get("attention_mask")):
            return generate(*args, **kwargs)


def _task_list(task) -> list[int]:
    if task is None:
        return []
    items = [task] if not isinstance(task, (list, tuple, set, frozenset, range)) else list(task)
    out = []
    for k in items:
        try:
            out.append(operator.index(k))  # ints, numpy integers, integer 0-d tensors
        except TypeError:
            raise ValueError(f"task must be an int or a list of ints, got {k!r}") from None
    return out


def set_trainable(
    model: nn.Module, task: Union[int, Iterable[int], None] = None, shared: bool = True, gate: bool = True
) -> list[str]:
    """Freeze everything, then make the shared experts (``shared``), task expert(s) ``task``
    and the gates (``gate``) trainable, and the ``modules_to_save`` of ``inject``. Returns the
    names of the trainable parameters."""
    layers = _layers(model)
    E = num_tasks(model)
    tasks = _task_list(task)
    for k in tasks:
        if not 0 <= k < E:
            raise ValueError(f"task={k} is out of range for num_tasks={E}")
    for p in model.parameters():
        p.requires_grad_(False)
    for layer in layers.values():
        layer.set_trainable(tasks, shared=shared, gate=gate)
    snapshots.warn_frozen(layers.values(), tasks)
    from .peft_compat import saved_module_parameters

    for p in saved_module_parameters(model).values():  # modules_to_save stay trainable (PEFT's rule)
        p.requires_grad_(True)
    return [n for n, p in model.named_parameters() if p.requires_grad]


def _check_backend_name(backend: str) -> None:
    get_backend(backend)  # ValueError naming the known backends for an unknown name


def set_backend(model: nn.Module, backend: Optional[str]) -> None:
    """Backend for every injected layer: a name, ``"auto"`` (the automatic choice, whatever
    ``$MOECL_BACKEND`` says: an explicit call wins) or None (``$MOECL_BACKEND``, else auto)."""
    if backend not in (None, "auto"):
        _check_backend_name(backend)
    for layer in _layers(model).values():
        layer.backend = backend


def collect_pooled(model: nn.Module, enabled: bool = True, modules: Optional[Iterable[str]] = None) -> None:
    """From the next forward on, keep each injected module's pooled shared-path output p_n
    (docs/spec.md) for :func:`pooled_outputs`; ``modules`` restricts it to those names."""
    layers = _layers(model)
    names = None
    if enabled and modules is not None:
        names = frozenset(modules)
        unknown = names - set(layers)
        if unknown:
            raise ValueError(f"modules names unknown injected modules: {sorted(unknown)}")
    for name, layer in layers.items():
        on = bool(enabled) and (names is None or name in names)
        if on and layer.level == "ffn" and not layer.gate:
            raise ValueError(f"collect_pooled: module {name!r} is an ungated FFN-level MLP; its pooled shared output "
                             "needs gate=True (without a gate FFN_shared(x) is not evaluated)")
    for name, layer in layers.items():
        layer.collect_pooled = bool(enabled) and (names is None or name in names)
    PooledResults.of(model).set({})


def pooled_outputs(model: nn.Module) -> dict[str, Tensor]:
    """p_n [B, d_out] per module from the last call that routed ``model`` (``model(...,
    task_ids=)`` or a ``use_tasks`` block); differentiable; empty unless collect_pooled."""
    res = model.__dict__.get(PooledResults.ATTR)
    if res is None or not res.by_layer:
        return {}
    return {name: res.by_layer[layer] for name, layer in _layers(model).items() if layer in res.by_layer}


def config(model: nn.Module) -> dict:
    """The injection config (level, target_modules, num_tasks, r, alpha, dropout, gate, rslora),
    read from the layers (``target_modules`` as given to ``inject``, when one inject covers ``model``)."""
    layers = _layers(model)
    cfg = dict(num_tasks=num_tasks(model))
    settings = [m.settings() for m in layers.values()]
    for key in settings[0]:
        if any(s[key] != settings[0][key] for s in settings):
            raise ValueError(f"the injected layers of this model disagree on {key}")
        cfg[key] = settings[0][key]
    roots = [m.__dict__[CONFIG_ATTR] for m in model.modules() if CONFIG_ATTR in m.__dict__]
    cfg["target_modules"] = roots[0]["target_modules"] if len(roots) == 1 else None
    from .peft_compat import modules_to_save

    cfg["modules_to_save"] = modules_to_save(model)
    return cfg

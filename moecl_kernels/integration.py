"""Hugging Face integration: ``inject``, model-wide routing, ``use_tasks``, ``set_trainable``.

``inject`` replaces the targeted ``nn.Linear`` modules by :class:`FusedMoELoRALinear`
and installs one :class:`RoutingContext` on the model. A forward pre-hook on the model
takes ``task_ids=`` out of the call (HF models do not know it) and starts a new
forward; the first injected layer that runs builds the routing (token->task map,
grouped token order, offsets, pooling weights) and every other layer reuses it.
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Optional, Sequence, Union

import torch
import torch.nn as nn
from torch import Tensor

from .layer import FusedMoELoRALinear
from .routing import Routing, RoutingError, TaskIds, build_routing

STATE_ATTR = "_moecl"


class RoutingContext:
    """Per-model routing state shared by every injected layer."""

    def __init__(self, num_tasks: int) -> None:
        self.num_tasks = num_tasks
        self.backend: Optional[str] = None
        self.forward_id = 0
        self._call_task_ids: Optional[TaskIds] = None
        self._call_mask: Optional[Tensor] = None
        self._stack: list[tuple[TaskIds, Optional[Tensor]]] = []  # mk.use_tasks
        self._cache: dict = {}
        self.collect: Union[bool, frozenset] = False
        self.pooled: dict[str, Tensor] = {}

    # called by the model's forward pre-hook
    def begin_forward(self, task_ids: Optional[TaskIds], attention_mask: Optional[Tensor]) -> None:
        self.forward_id += 1
        self._call_task_ids = task_ids
        self._call_mask = attention_mask
        self._cache = {}
        self.pooled = {}

    def _source(self) -> tuple[TaskIds, Optional[Tensor]]:
        if self._call_task_ids is not None:
            mask = self._call_mask
            return self._call_task_ids, mask
        if self._stack:
            ids, mask = self._stack[-1]
            return ids, mask if mask is not None else self._call_mask
        raise RoutingError(
            "task_ids is missing: call model(..., task_ids=t) or wrap the call in "
            "`with mk.use_tasks(model, t):` (generate() and custom loops)"
        )

    def routing_for(self, num_tokens: int, device: torch.device) -> Routing:
        key = (num_tokens, str(device))
        r = self._cache.get(key)
        if r is None:
            ids, mask = self._source()
            r = build_routing(ids, self.num_tasks, num_tokens, device=device)
            if mask is not None and r.batch_shape is not None and tuple(mask.shape) == tuple(r.batch_shape):
                r.attention_mask = mask
            self._cache[key] = r
        return r

    def wants_pooled(self, name: str) -> bool:
        return bool(self.collect) and (self.collect is True or name in self.collect)

    def store_pooled(self, name: str, p: Tensor) -> None:
        self.pooled[name] = p


@dataclass
class MoECLState:
    ctx: RoutingContext
    config: dict
    layer_names: list[str] = field(default_factory=list)
    hook_handles: list = field(default_factory=list)


def _state(model: nn.Module) -> MoECLState:
    st = getattr(model, STATE_ATTR, None)
    if st is None:
        raise ValueError("model has no MoE-CL layers: prepare it with mk.inject(model, ...) first")
    return st


def is_injected(model: nn.Module) -> bool:
    return getattr(model, STATE_ATTR, None) is not None


def moe_layers(model: nn.Module) -> dict[str, FusedMoELoRALinear]:
    """Every injected layer by its module name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, FusedMoELoRALinear)}


def _matches(name: str, targets: Union[str, Sequence[str]]) -> bool:
    if isinstance(targets, str):  # PEFT semantics: one string is a regex on the full name
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def find_targets(model: nn.Module, target_modules: Union[str, Sequence[str]]) -> list[str]:
    """Names of the modules ``inject`` would replace; raises on unsupported module types."""
    names = []
    for name, mod in model.named_modules():
        if not name or not _matches(name, target_modules):
            continue
        if isinstance(mod, FusedMoELoRALinear):
            raise ValueError(f"module {name!r} is already a FusedMoELoRALinear (model injected twice?)")
        if isinstance(mod, nn.Linear):
            names.append(name)
        elif type(mod).__name__ == "Conv1D":
            raise TypeError(
                f"target_modules matched {name!r}, a transformers Conv1D (GPT-2 style, transposed weight), "
                "which FusedMoELoRALinear does not support; target nn.Linear modules"
            )
        elif any(isinstance(c, nn.Linear) for c in mod.children()):
            continue  # a container whose name matches (e.g. 'mlp'); its Linear children are matched by name
        else:
            raise TypeError(
                f"target_modules matched {name!r} of type {type(mod).__name__}; only torch.nn.Linear is supported"
            )
    if not names:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
        raise ValueError(f"target_modules={target_modules!r} matched no nn.Linear; the model's Linear names are {linear}")
    return names


def _pre_hook(ctx: RoutingContext):
    def hook(module, args, kwargs):
        task_ids = kwargs.pop("task_ids", None)
        mask = kwargs.get("attention_mask")
        if mask is None and len(args) >= 2 and isinstance(args[1], Tensor) and isinstance(args[0], Tensor):
            if args[1].dim() == 2 and args[1].shape == args[0].shape[:2]:
                mask = args[1]  # HF forward(input_ids, attention_mask, ...)
        ctx.begin_forward(task_ids, mask)
        return args, kwargs

    return hook


def inject(
    model: nn.Module,
    target_modules: Union[str, Sequence[str]] = ("gate_proj", "up_proj", "down_proj"),
    num_tasks: int = 1,
    r: int = 8,
    alpha: float = 16.0,
    dropout: float = 0.05,
    gate: bool = True,
    rslora: bool = False,
    backend: Optional[str] = None,
    deterministic: bool = False,
) -> nn.Module:
    """Replace the targeted ``nn.Linear`` modules by :class:`FusedMoELoRALinear` (in place).

    ``target_modules``: a list of module-name suffixes (``"up_proj"`` matches
    ``model.layers.0.mlp.up_proj``) or one regex matched against full names. All
    non-MoE parameters are frozen; shared experts, task experts and gates are trainable
    (narrow that with :func:`set_trainable`). Afterwards ``model(..., task_ids=t)`` routes
    each sequence to its task expert. Returns the model.
    """
    if is_injected(model):
        raise ValueError("model is already injected; use mk.add_tasks(model, n) to grow it")
    names = find_targets(model, target_modules)  # validate everything before changing anything
    FusedMoELoRALinear.check_args(num_tasks, r, dropout)
    for p in model.parameters():
        p.requires_grad_(False)
    ctx = RoutingContext(int(num_tasks))
    ctx.backend = backend
    for name in names:
        lin = model.get_submodule(name)
        layer = FusedMoELoRALinear(lin, num_tasks, r, alpha, dropout, gate, rslora, None, deterministic)
        layer.train(lin.training)  # keep the model's train/eval mode
        layer._moecl_ctx = ctx
        layer._moecl_name = name
        _set_submodule(model, name, layer)
    config = dict(
        target_modules=list(target_modules) if not isinstance(target_modules, str) else target_modules,
        num_tasks=int(num_tasks), r=int(r), alpha=float(alpha), dropout=float(dropout), gate=bool(gate),
        rslora=bool(rslora),
    )
    st = MoECLState(ctx=ctx, config=config, layer_names=names)
    st.hook_handles.append(model.register_forward_pre_hook(_pre_hook(ctx), with_kwargs=True))
    setattr(model, STATE_ATTR, st)
    return model


def add_tasks(model: nn.Module, n: int) -> int:
    """Grow every injected layer by ``n`` task experts (trained experts are kept). Returns the new count."""
    st = _state(model)
    for layer in moe_layers(model).values():
        layer.add_tasks(n)
    st.ctx.num_tasks += n
    st.config["num_tasks"] = st.ctx.num_tasks
    return st.ctx.num_tasks


@contextlib.contextmanager
def use_tasks(model: nn.Module, task_ids: TaskIds, attention_mask: Optional[Tensor] = None) -> Iterator[nn.Module]:
    """Route every forward inside the block with ``task_ids`` (for ``generate()`` and custom loops).

    Per-sequence ids broadcast over whatever sequence length each forward has
    (prefill, then one token per decode step).
    """
    ctx = _state(model).ctx
    ctx._stack.append((task_ids, attention_mask))
    try:
        yield model
    finally:
        ctx._stack.pop()


def set_trainable(
    model: nn.Module, task: Union[int, Iterable[int], None] = None, shared: bool = True, gate: bool = True
) -> list[str]:
    """Freeze everything, then make the shared experts (``shared``), task expert(s) ``task``
    and the gates (``gate``) trainable. Returns the names of the trainable parameters."""
    st = _state(model)
    tasks = [] if task is None else ([task] if isinstance(task, int) else list(task))
    for k in tasks:
        if not 0 <= k < st.ctx.num_tasks:
            raise ValueError(f"task={k} is out of range for num_tasks={st.ctx.num_tasks}")
    for p in model.parameters():
        p.requires_grad_(False)
    for layer in moe_layers(model).values():
        layer.lora_shared_A.requires_grad_(shared)
        layer.lora_shared_B.requires_grad_(shared)
        if layer.moe_gate is not None:
            layer.moe_gate.requires_grad_(gate)
        for k in tasks:
            layer.lora_task_A[k].requires_grad_(True)
            layer.lora_task_B[k].requires_grad_(True)
    return [n for n, p in model.named_parameters() if p.requires_grad]


def set_backend(model: nn.Module, backend: Optional[str]) -> None:
    """Backend for every injected layer (None or 'auto' = ``$MOECL_BACKEND`` / auto)."""
    _state(model).ctx.backend = None if backend in (None, "auto") else backend
    for layer in moe_layers(model).values():
        layer.backend = None


def collect_pooled(model: nn.Module, enabled: bool = True, modules: Optional[Iterable[str]] = None) -> None:
    """From the next forward on, store each injected module's pooled shared-path output
    p_n (SPEC §1) for :func:`pooled_outputs`; ``modules`` restricts it to those names."""
    ctx = _state(model).ctx
    if not enabled:
        ctx.collect = False
    elif modules is None:
        ctx.collect = True
    else:
        names = frozenset(modules)
        unknown = names - set(moe_layers(model))
        if unknown:
            raise ValueError(f"modules names unknown injected modules: {sorted(unknown)}")
        ctx.collect = names
    ctx.pooled = {}


def pooled_outputs(model: nn.Module) -> dict[str, Tensor]:
    """p_n [B, d_out] per module from the last forward (differentiable; empty unless collect_pooled)."""
    return dict(_state(model).ctx.pooled)


def config(model: nn.Module) -> dict:
    """The injection config (num_tasks, r, alpha, dropout, gate, rslora, target_modules)."""
    return dict(_state(model).config)

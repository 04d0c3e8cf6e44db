"""What the MoE-CL modules share: the LoRA experts of one projection (:class:`LoRAProjection`)
and the protocol every routed module follows (:class:`MoEModule`), so that ``integration``,
``io`` and ``peft_import`` treat the linear level (``FusedMoELoRALinear``) and the FFN level
(``FusedMoELoRAMLP``) alike without knowing their insides.

Parameter names (checkpoint keys) of a projection: its base ``weight``/``bias`` (the wrapped
``nn.Linear``'s own Parameters, unchanged), ``lora_shared_A`` [r, d_in], ``lora_shared_B``
[d_out, r], ``lora_task_A.<k>`` [r, d_in], ``lora_task_B.<k>`` [d_out, r] (one Parameter per
task: frozen experts get no gradient, no optimizer state, no weight decay).
"""

from __future__ import annotations

import math
import numbers
import operator
from typing import Iterable, Iterator, Optional

import numpy as np
import torch
import torch.nn as nn
from torch import Tensor

from . import snapshots
from .routing import RoutedModule

ADAPTER_PREFIXES = ("lora_", "moe_gate")  # the parameter names of the experts and the gate


def init_A(t: Tensor) -> Tensor:
    # PEFT / docs/spec.md §0: kaiming-uniform with a = sqrt(5)
    nn.init.kaiming_uniform_(t, a=math.sqrt(5))
    return t


def check_args(num_tasks, r, dropout, alpha=16.0) -> tuple[int, int, float, float]:
    """(num_tasks, r, alpha, dropout) as int, int, float, float; ValueError naming the
    argument for a non-integer count, num_tasks or r < 1, alpha <= 0, dropout outside [0, 1)."""
    def integer(name, v, lo):
        try:
            i = operator.index(v)
        except TypeError:
            i = None
            if isinstance(v, Tensor) and v.numel() == 1 and not v.is_floating_point():
                i = int(v)
        if i is None:
            raise ValueError(f"{name} must be an integer, got {v!r}")
        if i < lo:
            raise ValueError(f"{name} must be >= {lo}, got {i}")
        return i

    def real(name, v):
        if isinstance(v, bool) or not isinstance(v, (numbers.Real, Tensor)) or not math.isfinite(float(v)):
            raise ValueError(f"{name} must be a finite number, got {v!r}")
        return float(v)

    num_tasks, r = integer("num_tasks", num_tasks, 1), integer("r", r, 1)
    alpha, dropout = real("alpha", alpha), real("dropout", dropout)
    if alpha <= 0:
        raise ValueError(f"alpha must be > 0, got {alpha:g}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout:g}")
    return num_tasks, r, alpha, dropout


def check_flag(name: str, v) -> bool:
    """``v`` as a bool; ValueError naming ``name`` for anything but True/False (``"False"`` is not False)."""
    if isinstance(v, (bool, np.bool_)):
        return bool(v)
    raise ValueError(f"{name} must be True or False, got {v!r} ({type(v).__name__})")


def check_flags(**flags) -> tuple[bool, ...]:
    """The values of ``flags`` (name=value) as bools, in order (:func:`check_flag` each)."""
    return tuple(check_flag(name, v) for name, v in flags.items())


def check_rank(r: int, in_features: int, out_features: int) -> None:
    """A LoRA rank above min(in_features, out_features) adds nothing and only costs memory and time."""
    if r > min(in_features, out_features):
        raise ValueError(f"r={r} exceeds min(in_features, out_features) = {min(in_features, out_features)} of a "
                         f"{in_features} -> {out_features} projection: a LoRA rank can be at most that")


def is_conv1d(module) -> bool:
    """A transformers ``Conv1D`` (GPT-2 style): ``y = x W + b`` with ``W`` [in, out] (transposed)."""
    return type(module).__name__ == "Conv1D" and getattr(getattr(module, "weight", None), "dim", lambda: 0)() == 2


def projection_dims(base: nn.Module) -> tuple[int, int, bool]:
    """(in_features, out_features, fan_in_fan_out) of an ``nn.Linear`` or a transformers ``Conv1D``."""
    if isinstance(base, nn.Linear):
        return base.in_features, base.out_features, False
    if is_conv1d(base):
        return int(base.weight.shape[0]), int(base.weight.shape[1]), True
    raise TypeError(f"expected a torch.nn.Linear or a transformers Conv1D, got {type(base).__name__}")


def check_count(n) -> int:
    try:
        n = operator.index(n)
    except TypeError:
        raise ValueError(f"n must be an integer, got {n!r}") from None
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    return n



def plist(params: nn.ParameterList) -> list[nn.Parameter]:
    """The parameters of a ParameterList, in order (its own iteration indexes one by one through
    ``__getitem__``, tens of microseconds per layer call at decode)."""
    return list(params._parameters.values())

class LoRAProjection:
    """Mixin of an ``nn.Module`` holding one frozen base projection and its LoRA experts: a
    shared expert and one expert per task. Call :meth:`init_projection` from ``__init__``."""

    weight: nn.Parameter
    bias: Optional[nn.Parameter]

    def init_projection(self, base: nn.Linear, r: int, alpha: float, rslora: bool) -> None:
        """The base weight and bias (frozen) and the shared expert; task experts come with
        :meth:`add_task_experts`."""
        self.in_features, self.out_features, self.fan_in_fan_out = projection_dims(base)
        check_rank(int(r), self.in_features, self.out_features)
        self.weight = base.weight
        self.weight.requires_grad_(False)
        self.bias = base.bias
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.r = int(r)
        self.lora_alpha = float(alpha)
        self.use_rslora = bool(rslora)
        self.scaling = self.lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r)
        fk = dict(device=self.weight.device, dtype=self.weight.dtype)
        self.lora_shared_A = nn.Parameter(init_A(torch.empty(self.r, self.in_features, **fk)))
        self.lora_shared_B = nn.Parameter(torch.zeros(self.out_features, self.r, **fk))
        self.lora_task_A = nn.ParameterList()
        self.lora_task_B = nn.ParameterList()
        self._stack_cache: Optional[tuple] = None
        self._merged: list[int] = []  # task experts whose delta is in the base weight (contribute nothing else)

    def add_task_experts(self, n: int, trainable: bool) -> None:
        """Append ``n`` freshly initialised task experts (A kaiming-uniform, B zero)."""
        fk = dict(device=self.weight.device, dtype=self.lora_shared_A.dtype)
        for _ in range(n):
            self.lora_task_A.append(nn.Parameter(init_A(torch.empty(self.r, self.in_features, **fk)),
                                                 requires_grad=trainable))
            self.lora_task_B.append(nn.Parameter(torch.zeros(self.out_features, self.r, **fk), requires_grad=trainable))
        self._stack_cache = None

    def base_weight(self) -> Tensor:
        """The base weight as [out_features, in_features] (a transposed view for a ``Conv1D`` base)."""
        return self.weight.t() if getattr(self, "fan_in_fan_out", False) else self.weight

    def drop_stack_cache(self) -> None:
        self._stack_cache = None

    def lora_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """(name, parameter) of the shared and task experts of this projection."""
        return ((n, p) for n, p in self.named_parameters() if n.startswith("lora_"))

    def set_lora_trainable(self, tasks: Iterable[int], shared: bool) -> None:
        self.lora_shared_A.requires_grad_(shared)
        self.lora_shared_B.requires_grad_(shared)
        for k in tasks:
            self.lora_task_A[k].requires_grad_(True)
            self.lora_task_B[k].requires_grad_(True)

    def stacked_experts(self, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """[E, r, d_in] and [E, d_out, r] stacks of the task experts, in ``dtype``.

        Stacked through autograd when an expert needs a gradient; otherwise cached until
        an expert changes (in-place optimizer updates bump the version counter).
        """
        As, Bs = plist(self.lora_task_A), plist(self.lora_task_B)
        needs_graph = torch.is_grad_enabled() and any(p.requires_grad for p in As + Bs)
        merged = getattr(self, "_merged", ())
        Bm = [torch.zeros_like(b) if k in merged else b for k, b in enumerate(Bs)] if merged else Bs
        if needs_graph or torch.compiler.is_compiling():
            return torch.stack(As).to(dtype), torch.stack(Bm).to(dtype)
        key = (dtype, tuple((p.data_ptr(), p._version) for p in As + Bs), tuple(merged))
        if self._stack_cache is None or self._stack_cache[0] != key:
            with torch.no_grad():
                self._stack_cache = (key, torch.stack(As).to(dtype), torch.stack(Bm).to(dtype))
        return self._stack_cache[1], self._stack_cache[2]

    def task_trainable(self) -> list[bool]:
        return [bool(a.requires_grad or b.requires_grad) for a, b in zip(plist(self.lora_task_A), plist(self.lora_task_B))]

    def merge_expert(self, k: int, sign: float = 1.0) -> None:
        """Add task expert ``k``'s LoRA, ``s * B_k A_k``, into the base weight (``sign=-1``: take it out)."""
        self.merge_lora(self.lora_task_A[k], self.lora_task_B[k], sign)

    @torch.no_grad()
    def merge_lora(self, A: Tensor, B: Tensor, sign: float = 1.0) -> None:
        """Add ``sign * s * B A`` into the base weight."""
        acc = torch.promote_types(self.weight.dtype, torch.float32)  # fp32 accumulation, fp64 for fp64 weights
        delta = (sign * self.scaling * (B.to(acc) @ A.to(acc))).to(self.weight.dtype)
        if getattr(self, "fan_in_fan_out", False):
            delta = delta.t().contiguous()
        w = self.weight
        if hasattr(w, "device_mesh") and hasattr(w, "placements"):  # an FSDP2-sharded (DTensor) base weight
            from torch.distributed.tensor import distribute_tensor

            delta = distribute_tensor(delta.to(w.device), w.device_mesh, w.placements)
        w.add_(delta)


class MoEModule(RoutedModule):
    """The protocol of the routed MoE-CL modules. Subclasses set ``level`` and implement
    :meth:`lora_projections` (its projections, each a :class:`LoRAProjection`) and
    :meth:`expected_adapters`; they own ``moe_gate`` ([2, d] or None), ``r``, ``lora_alpha``,
    ``dropout_p``, ``use_rslora``, ``scaling``, ``backend``, ``deterministic`` and
    ``collect_pooled`` (store the pooled shared path p_n in the routing context)."""

    level: str
    moe_gate: Optional[nn.Parameter]

    def lora_projections(self) -> list[LoRAProjection]:
        raise NotImplementedError

    @classmethod
    def expected_adapters(cls, model: nn.Module, name: str, r: int, num_tasks: int, gate: bool) -> dict[str, tuple]:
        """The adapter tensors (full parameter names in ``model``) and shapes that injecting this
        module at ``name`` with these settings creates, computed without changing ``model``."""
        raise NotImplementedError

    @property
    def num_tasks(self) -> int:
        return len(self.lora_projections()[0].lora_task_A)

    @property
    def gate(self) -> bool:
        return self.moe_gate is not None

    def settings(self) -> dict:
        """The injection settings this module was built with (``mk.config``)."""
        return dict(level=self.level, r=self.r, alpha=self.lora_alpha, dropout=self.dropout_p, gate=self.gate,
                    rslora=self.use_rslora)

    def expert_trainable(self) -> list[bool]:
        """Per task expert: does any of its parameters (in any projection) require grad."""
        return [any(t) for t in zip(*(p.task_trainable() for p in self.lora_projections()))]

    def add_tasks(self, n: int, trainable: Optional[bool] = None) -> None:
        """Append ``n`` freshly initialised task experts; trained ones are kept as they are.

        ``trainable=None``: the new experts are trainable only if every existing one is (after
        ``set_trainable(task=k)`` froze the others, new experts start frozen too)."""
        n = check_count(n)
        if trainable is None:
            trainable = all(self.expert_trainable())
        for proj in self.lora_projections():
            proj.add_task_experts(n, trainable)

    def invalidate_cache(self) -> None:
        """Drop the cached stacks of task experts (after changing experts outside autograd's view)."""
        for proj in self.lora_projections():
            proj.drop_stack_cache()

    def set_trainable(self, tasks: Iterable[int] = (), shared: bool = True, gate: bool = True) -> None:
        """Make the shared expert (``shared``), task experts ``tasks`` and the gate (``gate``)
        trainable; freeze nothing else itself (``mk.set_trainable`` freezes the model first)."""
        tasks = list(tasks)
        for proj in self.lora_projections():
            proj.set_lora_trainable(tasks, shared)
        if self.moe_gate is not None:
            self.moe_gate.requires_grad_(gate)

    def adapter_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """(name, parameter) of the shared expert, the task experts and the gate (not the frozen
        base). Names are relative to this module; ``io`` names them by the model's own names."""
        return ((n, p) for n, p in self.named_parameters() if any(c.startswith(ADAPTER_PREFIXES) for c in n.split(".")))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        snapshots.prepare_load(self, state_dict, prefix)  # frozen tasks' buffers take the saved slot count
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @property
    def merged_tasks(self) -> list[int]:
        """The task experts merged into the base weights (:meth:`merge_task`), in merge order."""
        return list(getattr(self.lora_projections()[0], "_merged", []))

    def check_task(self, k, what: str) -> int:
        """``k`` as an index of this module's task experts; ValueError naming ``what`` otherwise."""
        try:
            i = operator.index(k)
        except TypeError:
            raise ValueError(f"{what}: task must be an int, got {k!r}") from None
        if not 0 <= i < self.num_tasks:
            raise ValueError(f"{what}: task={i} is out of range: this module has task experts 0..{self.num_tasks - 1}")
        return i

    def merge_task(self, k: int) -> None:
        """Add task expert ``k``'s LoRA into the base weight of every projection (for an ungated
        module its term is then part of the base for every token: O-LoRA's merge). The expert
        then contributes nothing else (its tokens are not given its delta twice); :meth:`unmerge_task`
        undoes it, and ``mk.save`` records it."""
        k = self.check_task(k, "merge_task")
        if self.gate:
            raise ValueError("merge_task needs a layer without a gate (gate=False): a gated expert is not a fixed delta")
        if k in self.merged_tasks:
            raise ValueError(f"merge_task: task {k} is already merged into the base weights")
        for proj in self.lora_projections():
            proj.merge_expert(k)
            proj._merged = [*getattr(proj, "_merged", []), k]
            proj.drop_stack_cache()

    def unmerge_task(self, k: int) -> None:
        """Undo :meth:`merge_task`: take expert ``k``'s delta out of the base weights (exact up to
        the base dtype's rounding) and route its tokens through the expert again."""
        k = self.check_task(k, "unmerge_task")
        if k not in self.merged_tasks:
            raise ValueError(f"unmerge_task: task {k} is not merged (merged: {self.merged_tasks})")
        for proj in self.lora_projections():
            proj.merge_expert(k, sign=-1.0)
            proj._merged = [j for j in proj._merged if j != k]
            proj.drop_stack_cache()

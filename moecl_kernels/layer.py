"""``FusedMoELoRALinear``: a frozen ``nn.Linear`` plus a shared LoRA expert, one LoRA
expert per task and a per-token gate, computed by the fused op of docs/spec.md §1."""

from __future__ import annotations

import math
import numbers
import operator
from typing import Iterator, Optional

import torch
import torch.nn as nn
from torch import Tensor

from .ops.linear import moe_lora_linear
from .ops.pooling import pooled_shared_path
from .routing import RoutedModule, Routing, RoutingError, TaskIds, keep_alive, structure_changed

ADAPTER_PREFIXES = ("lora_", "moe_gate")  # the parameter names of the experts and the gate


def _init_A(t: Tensor) -> Tensor:
    # PEFT / docs/spec.md §0: kaiming-uniform with a = sqrt(5)
    nn.init.kaiming_uniform_(t, a=math.sqrt(5))
    return t


class FusedMoELoRALinear(RoutedModule):
    """Drop-in replacement for an ``nn.Linear`` with MoE-CL LoRA experts.

    y = x W^T + b + s * beta_shared * LoRA_shared(x~) + s * beta_task * LoRA_{t}(x~)

    The base ``weight``/``bias`` are the wrapped Linear's own Parameters (same names, so
    the model's state-dict keys for the base weights do not change) and stay frozen.
    Parameters: ``lora_shared_A`` [r, d_in], ``lora_shared_B`` [d_out, r],
    ``lora_task_A[k]`` [r, d_in], ``lora_task_B[k]`` [d_out, r] (one per task, separate
    Parameters so frozen experts get no gradient, no optimizer state and no weight
    decay), ``moe_gate`` [2, d_in] or None.
    """

    def __init__(
        self,
        base_linear: nn.Linear,
        num_tasks: int,
        r: int = 8,
        alpha: float = 16.0,
        dropout: float = 0.05,
        gate: bool = True,
        rslora: bool = False,
        backend: Optional[str] = None,
        deterministic: bool = False,
    ) -> None:
        super().__init__()
        if not isinstance(base_linear, nn.Linear):
            raise TypeError(
                f"base_linear must be a torch.nn.Linear, got {type(base_linear).__name__}"
                + (" (GPT-2 style transformers Conv1D is not supported: its weight is transposed)"
                   if type(base_linear).__name__ == "Conv1D" else "")
            )
        num_tasks, r, alpha, dropout = self.check_args(num_tasks, r, dropout, alpha)
        self.in_features = base_linear.in_features
        self.out_features = base_linear.out_features
        self.weight = base_linear.weight
        self.weight.requires_grad_(False)
        self.bias = base_linear.bias
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.r = int(r)
        self.lora_alpha = float(alpha)
        self.dropout_p = float(dropout)
        self.use_rslora = bool(rslora)
        self.scaling = self.lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r)
        self.backend = backend
        self.deterministic = bool(deterministic)
        fk = dict(device=self.weight.device, dtype=self.weight.dtype)
        self.lora_shared_A = nn.Parameter(_init_A(torch.empty(self.r, self.in_features, **fk)))
        self.lora_shared_B = nn.Parameter(torch.zeros(self.out_features, self.r, **fk))
        self.lora_task_A = nn.ParameterList()
        self.lora_task_B = nn.ParameterList()
        if gate:
            self.moe_gate = nn.Parameter(torch.empty(2, self.in_features, **fk).normal_(0.0, 0.02))
        else:
            self.register_parameter("moe_gate", None)
        self._stack_cache: Optional[tuple] = None
        self.add_tasks(num_tasks)
        self.collect_pooled = False  # store p_n in the routing context (mk.collect_pooled)
        structure_changed()

    @staticmethod
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

    # ------------------------------------------------------------------ experts
    @property
    def num_tasks(self) -> int:
        return len(self.lora_task_A)

    @property
    def gate(self) -> bool:
        return self.moe_gate is not None

    def add_tasks(self, n: int, trainable: Optional[bool] = None) -> None:
        """Append ``n`` freshly initialised task experts; trained ones are kept as they are.

        ``trainable=None``: the new experts are trainable only if every existing one is (after
        ``set_trainable(task=k)`` froze the others, new experts start frozen too)."""
        try:
            n = operator.index(n)
        except TypeError:
            raise ValueError(f"n must be an integer, got {n!r}") from None
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        if trainable is None:
            trainable = all(self.expert_trainable())
        fk = dict(device=self.weight.device, dtype=self.lora_shared_A.dtype)
        for _ in range(n):
            a = nn.Parameter(_init_A(torch.empty(self.r, self.in_features, **fk)), requires_grad=trainable)
            b = nn.Parameter(torch.zeros(self.out_features, self.r, **fk), requires_grad=trainable)
            self.lora_task_A.append(a)
            self.lora_task_B.append(b)
        self.invalidate_cache()

    def invalidate_cache(self) -> None:
        """Drop the cached stack of task experts (after changing experts outside autograd's view)."""
        self._stack_cache = None

    def adapter_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """(name, parameter) of the shared expert, the task experts and the gate (not the frozen base)."""
        return ((n, p) for n, p in self.named_parameters() if n.startswith(ADAPTER_PREFIXES))

    @torch.no_grad()
    def merge_task(self, k: int) -> None:
        """Add task expert ``k``'s LoRA, ``s * B_k A_k``, into the base weight (for an ungated
        layer its term is then part of the base for every token: O-LoRA's merge)."""
        if self.gate:
            raise ValueError("merge_task needs a layer without a gate (gate=False): a gated expert is not a fixed delta")
        delta = (self.scaling * (self.lora_task_B[k].float() @ self.lora_task_A[k].float())).to(self.weight.dtype)
        w = self.weight
        if hasattr(w, "device_mesh") and hasattr(w, "placements"):  # an FSDP2-sharded (DTensor) base weight
            from torch.distributed.tensor import distribute_tensor

            delta = distribute_tensor(delta.to(w.device), w.device_mesh, w.placements)
        w.add_(delta)

    def _stacked_experts(self, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """[E, r, d_in] and [E, d_out, r] stacks of the task experts, in ``dtype``.

        Stacked through autograd when an expert needs a gradient; otherwise cached until
        an expert changes (in-place optimizer updates bump the version counter).
        """
        As, Bs = list(self.lora_task_A), list(self.lora_task_B)
        needs_graph = torch.is_grad_enabled() and any(p.requires_grad for p in As + Bs)
        if needs_graph or torch.compiler.is_compiling():
            return torch.stack(As).to(dtype), torch.stack(Bs).to(dtype)
        key = (dtype, tuple((p.data_ptr(), p._version) for p in As + Bs))
        if self._stack_cache is None or self._stack_cache[0] != key:
            with torch.no_grad():
                self._stack_cache = (key, torch.stack(As).to(dtype), torch.stack(Bs).to(dtype))
        return self._stack_cache[1], self._stack_cache[2]

    def expert_trainable(self) -> list[bool]:
        return [bool(a.requires_grad or b.requires_grad) for a, b in zip(self.lora_task_A, self.lora_task_B)]

    # ------------------------------------------------------------------ forward
    def forward(self, x: Tensor, task_ids: Optional[TaskIds] = None, *, routing: Optional[Routing] = None) -> Tensor:
        """``task_ids``: one int, [B] or [B, S] for x [B, S, d_in] (docs/spec.md, "Routing");
        without it, the routing in force (``model(..., task_ids=)`` or ``mk.use_tasks``)."""
        if x.shape[-1] != self.in_features:
            raise ValueError(f"x has {x.shape[-1]} features in its last dim but the layer expects in_features={self.in_features}")
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        R, ctx = self.routing_for(lead, x.device, task_ids, routing)
        dt = x2.dtype
        weight, bias = self.weight, self.bias
        if torch.is_autocast_enabled(x2.device.type):  # what F.linear does under autocast
            dt = torch.get_autocast_dtype(x2.device.type)
            x2, weight = x2.to(dt), weight.to(dt)
            bias = bias.to(dt) if bias is not None else None
        # the base weight must match x (as for nn.Linear); the LoRA weights are cast to x's dtype
        A, B = self._stacked_experts(dt)
        gate = self.moe_gate.to(dt) if self.moe_gate is not None else None
        p = self.dropout_p if self.training else 0.0
        # drawn on x's device: a captured CUDA graph replays a fresh seed
        seed = torch.randint(0, 2**31 - 1, (), dtype=torch.int64, device=x.device) if p > 0.0 else None
        y = moe_lora_linear(
            x2, weight, bias,
            self.lora_shared_A.to(dt), self.lora_shared_B.to(dt), A, B, gate, R,
            scale=self.scaling, dropout_p=p, seed=seed, expert_trainable=self.expert_trainable(),
            deterministic=self.deterministic, backend=self.backend,
        )
        if ctx is not None:
            keep_alive(y, [ctx])  # a checkpointed recomputation in backward finds this call's routing
            if self.collect_pooled:
                ctx.store_pooled(self, self.pooled(x2, R))
        return y.reshape(*lead, self.out_features)

    def pooled(self, x2: Tensor, routing: Routing) -> Tensor:
        """p_n of docs/spec.md §1 for the flattened input x2 [T, d_in]: [B, d_out]."""
        B, S = routing.batch_shape if routing.batch_shape is not None else (None, None)
        if B is None:
            raise RoutingError("pooled outputs need a [batch, seq] input (the layer got flattened tokens)")
        dt = x2.dtype
        return pooled_shared_path(
            x2.view(B, S, self.in_features), routing.pool_weights(), self.weight.to(dt),
            self.bias.to(dt) if self.bias is not None else None,
            self.lora_shared_A.to(dt), self.lora_shared_B.to(dt), self.scaling,
        )

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"num_tasks={self.num_tasks}, r={self.r}, alpha={self.lora_alpha:g}, scaling={self.scaling:g}"
            f"{' (rslora)' if self.use_rslora else ''}, dropout={self.dropout_p:g}, gate={self.gate}, "
            f"backend={self.backend or 'auto'}"
        )

    def to_linear(self) -> nn.Linear:
        """A plain ``nn.Linear`` sharing the base weight and bias (what ``inject`` replaced)."""
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                        device="meta")
        lin.weight = self.weight
        if self.bias is not None:
            lin.bias = self.bias
        return lin

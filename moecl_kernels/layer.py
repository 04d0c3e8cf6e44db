"""``FusedMoELoRALinear``: a frozen ``nn.Linear`` plus a shared LoRA expert, one LoRA
expert per task and a per-token gate, computed by the fused op of SPEC §1."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Optional

import torch
import torch.nn as nn
from torch import Tensor

from .ops.op import moe_lora_linear
from .ops.pooling import pooled_shared_path
from .routing import Routing, RoutingError, TaskIds, build_routing

if TYPE_CHECKING:  # pragma: no cover
    from .integration import RoutingContext


def _init_A(t: Tensor) -> Tensor:
    # PEFT / SPEC §0: kaiming-uniform with a = sqrt(5)
    nn.init.kaiming_uniform_(t, a=math.sqrt(5))
    return t


class FusedMoELoRALinear(nn.Module):
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
        self.check_args(num_tasks, r, dropout)
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
        self.add_tasks(int(num_tasks))
        # set by mk.inject: the model-wide routing context and this module's name in the model
        self._moecl_ctx: Optional["RoutingContext"] = None
        self._moecl_name: str = ""
        self._stack_cache: Optional[tuple] = None

    @staticmethod
    def check_args(num_tasks: int, r: int, dropout: float) -> None:
        """Raise ValueError (naming the argument) for an unusable num_tasks, r or dropout."""
        if int(num_tasks) < 1:
            raise ValueError(f"num_tasks must be >= 1, got {num_tasks}")
        if int(r) < 1:
            raise ValueError(f"r must be >= 1, got {r}")
        if not 0.0 <= float(dropout) < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")

    # ------------------------------------------------------------------ experts
    @property
    def num_tasks(self) -> int:
        return len(self.lora_task_A)

    @property
    def gate(self) -> bool:
        return self.moe_gate is not None

    def add_tasks(self, n: int) -> None:
        """Append ``n`` freshly initialised task experts; trained ones are kept as they are."""
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        fk = dict(device=self.weight.device, dtype=self.lora_shared_A.dtype)
        for _ in range(n):
            self.lora_task_A.append(nn.Parameter(_init_A(torch.empty(self.r, self.in_features, **fk))))
            self.lora_task_B.append(nn.Parameter(torch.zeros(self.out_features, self.r, **fk)))
        self._stack_cache = None

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
    def _routing(self, task_ids: Optional[TaskIds], routing: Optional[Routing], x: Tensor, T: int) -> Routing:
        if routing is not None:
            return routing
        if task_ids is not None:
            return build_routing(task_ids, self.num_tasks, T, device=x.device)
        if self._moecl_ctx is not None:
            return self._moecl_ctx.routing_for(T, x.device)
        raise RoutingError(
            "task_ids is missing: call layer(x, task_ids=t), or model(..., task_ids=t) / "
            "mk.use_tasks(model, t) on a model prepared with mk.inject"
        )

    def forward(self, x: Tensor, task_ids: Optional[TaskIds] = None, *, routing: Optional[Routing] = None) -> Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"x has {x.shape[-1]} features in its last dim but the layer expects in_features={self.in_features}")
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        T = x2.shape[0]
        R = self._routing(task_ids, routing, x, T)
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
        seed = torch.randint(0, 2**31 - 1, (), dtype=torch.int64) if p > 0.0 else None
        ctx = self._moecl_ctx
        y = moe_lora_linear(
            x2, weight, bias,
            self.lora_shared_A.to(dt), self.lora_shared_B.to(dt), A, B, gate, R,
            scale=self.scaling, dropout_p=p, seed=seed, expert_trainable=self.expert_trainable(),
            deterministic=self.deterministic,
            backend=self.backend if self.backend is not None else (ctx.backend if ctx is not None else None),
        )
        if ctx is not None and ctx.wants_pooled(self._moecl_name):
            ctx.store_pooled(self._moecl_name, self.pooled(x2, R))
        return y.reshape(*lead, self.out_features)

    def pooled(self, x2: Tensor, routing: Routing) -> Tensor:
        """p_n of SPEC §1 for the flattened input x2 [T, d_in]: [B, d_out]."""
        B, S = routing.batch_shape if routing.batch_shape is not None else (None, None)
        if B is None:
            raise RoutingError("pooled outputs need per-sequence task_ids ([batch] or [batch, seq])")
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

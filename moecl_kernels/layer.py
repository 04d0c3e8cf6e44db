"""``FusedMoELoRALinear``: a frozen ``nn.Linear`` plus a shared LoRA expert, one LoRA
expert per task and a per-token gate, computed by the fused op of docs/spec.md §1."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
from torch import Tensor

from . import snapshots
from .adapters_off import disabled
from .experts import LoRAProjection, MoEModule, check_args, check_flags, is_conv1d, projection_dims
from .ops.linear import moe_lora_linear
from .ops.pooling import pooled_shared_path
from .routing import Routing, RoutingError, TaskIds, keep_alive, structure_changed


class FusedMoELoRALinear(MoEModule, LoRAProjection):
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
        if not isinstance(base_linear, nn.Linear) and not is_conv1d(base_linear):
            raise TypeError(f"base_linear must be a torch.nn.Linear or a transformers Conv1D (GPT-2), got "
                            f"{type(base_linear).__name__}")
        self._base_cls = [type(base_linear)]  # what to_linear() gives back
        num_tasks, r, alpha, dropout = check_args(num_tasks, r, dropout, alpha)
        gate, rslora, deterministic = check_flags(gate=gate, rslora=rslora, deterministic=deterministic)
        self.init_projection(base_linear, r, alpha, rslora)
        self.dropout_p = float(dropout)
        self.backend = backend
        self.deterministic = bool(deterministic)
        if gate:
            fk = dict(device=self.weight.device, dtype=self.weight.dtype)
            self.moe_gate = nn.Parameter(torch.empty(2, self.in_features, **fk).normal_(0.0, 0.02))
        else:
            self.register_parameter("moe_gate", None)
        self.add_task_experts(num_tasks, True)
        self.collect_pooled = False  # store p_n in the routing context (mk.collect_pooled)
        structure_changed()

    level = "linear"
    check_args = staticmethod(check_args)

    def lora_projections(self) -> list[LoRAProjection]:
        return [self]

    @classmethod
    def expected_adapters(cls, model: nn.Module, name: str, r: int, num_tasks: int, gate: bool) -> dict[str, tuple]:
        d_in, d_out, _ = projection_dims(model.get_submodule(name))
        shapes = {f"{name}.lora_shared_A": (r, d_in), f"{name}.lora_shared_B": (d_out, r)}
        for k in range(num_tasks):
            shapes[f"{name}.lora_task_A.{k}"] = (r, d_in)
            shapes[f"{name}.lora_task_B.{k}"] = (d_out, r)
        if gate:
            shapes[f"{name}.moe_gate"] = (2, d_in)
        return shapes

    # ------------------------------------------------------------------ forward
    def forward(self, x: Tensor, task_ids: Optional[TaskIds] = None, *, routing: Optional[Routing] = None) -> Tensor:
        """``task_ids``: one int, [B] or [B, S] for x [B, S, d_in] (docs/spec.md, "Routing");
        without it, the routing in force (``model(..., task_ids=)`` or ``mk.use_tasks``)."""
        if x.shape[-1] != self.in_features:
            raise ValueError(f"x has {x.shape[-1]} features in its last dim but the layer expects in_features={self.in_features}")
        if disabled(self):  # mk.disable_adapters: the wrapped module exactly, no routing needed
            if self.fan_in_fan_out:  # Conv1D's own formula
                return torch.addmm(self.bias, x.reshape(-1, self.in_features), self.weight).view(*x.shape[:-1], -1)
            return torch.nn.functional.linear(x, self.weight, self.bias)
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        R, ctx = self.routing_for(lead, x.device, task_ids, routing)
        dt = x2.dtype
        weight, bias = self.base_weight(), self.bias
        if self.fan_in_fan_out:
            weight = weight.contiguous()  # Conv1D's [in, out] weight as [out, in] (a copy per call)
        if torch.is_autocast_enabled(x2.device.type):  # what F.linear does under autocast
            dt = torch.get_autocast_dtype(x2.device.type)
            x2, weight = x2.to(dt), weight.to(dt)
            bias = bias.to(dt) if bias is not None else None
        # the base weight must match x (as for nn.Linear); the LoRA weights are cast to x's dtype
        A, B = self.stacked_experts(dt)
        gate = self.moe_gate.to(dt) if self.moe_gate is not None else None
        p = self.dropout_p if self.training else 0.0
        # drawn on x's device: a captured CUDA graph replays a fresh seed
        seed = torch.randint(0, 2**31 - 1, (), dtype=torch.int64, device=x.device) if p > 0.0 else None
        y = moe_lora_linear(
            x2, weight, bias,
            self.lora_shared_A.to(dt), self.lora_shared_B.to(dt), A, B, gate, R,
            scale=self.scaling, dropout_p=p, seed=seed, expert_trainable=self.expert_trainable(),
            deterministic=self.deterministic, backend=self.backend, **snapshots.linear_args(self, dt),
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
            x2.view(B, S, self.in_features), routing.pool_weights(), self.base_weight().to(dt),
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

    def to_linear(self) -> nn.Module:
        """A plain ``nn.Linear`` (or ``Conv1D``) sharing the base weight and bias (what ``inject`` replaced)."""
        if self.fan_in_fan_out:
            lin = self._base_cls[0](self.out_features, self.in_features)  # Conv1D(nf, nx)
        else:
            lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        lin.weight = self.weight
        if self.bias is not None:
            lin.bias = self.bias
        return lin

"""The implementations ``bench_ffn`` times: a gated MLP (SiLU) wrapped at the FFN level
(docs/spec.md §1.3), each behind ``providers.Provider``'s interface.

Semantics (checked against the float64 ``moe_lora_mlp_reference`` on a subset of rows):

* ``base``: the base MLP, y = down(silu(gate(x)) * up(x)) -- 3 GEMMs + the activation (the floor)
* ``moe``:  the FFN-level op, y = c_s FFN_shared(x) + c_t FFN_task(x)

Providers: base-mlp; two-ffn (the MoE-CL reference code's approach: every expert a whole MLP
with LoRA on its three projections, the shared one evaluated on every token and each task's on
its tokens -- two full FFN evaluations, autograd for the backward); eager and triton (the op,
``moe_lora_mlp(..., backend=...)``: base GEMMs once, one down GEMM on the mixed h).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from moecl_kernels.ops import moe_lora_mlp
from moecl_kernels.routing import Routing

from .providers import Bound, OpBackend, Provider

PROJ = ("gate_proj", "up_proj", "down_proj")
LORA = tuple(f"{p}_{part}" for p in PROJ for part in ("shared_A", "shared_B", "task_A", "task_B")) + ("moe_gate",)


@dataclass
class FfnInputSet:
    """One rotation set: x, the frozen base weights, the LoRA factors and gate (``LORA`` names,
    trainable in fwd+bwd mode) and the upstream gradient."""

    x: Tensor                 # [T, d]
    weights: dict[str, Tensor]  # gate_proj_weight / up_proj_weight [d_ff, d], down_proj_weight [d, d_ff]
    lora: dict[str, Tensor]
    grad_y: Tensor            # [T, d]

    def tensors(self) -> list[Tensor]:
        return [self.x, *self.weights.values(), *self.lora.values(), self.grad_y]


@dataclass
class FfnProblem:
    sets: list[FfnInputSet]
    routing: Routing
    seq_tasks: list[int]
    scale: float
    backward: bool
    device: torch.device
    activation: str = "silu"

    @property
    def dims(self) -> tuple[int, int, int, int, int]:
        """(T, d, d_ff, r, E)."""
        s = self.sets[0]
        E, r, d = s.lora["up_proj_task_A"].shape
        return s.x.shape[0], d, s.weights["up_proj_weight"].shape[0], r, E


def _lora_targets(s: FfnInputSet) -> dict[str, Tensor]:
    return {"x": s.x, **s.lora}


class BaseMLP(Provider):
    """The base MLP; timed twice per case (``base-mlp``, ``base-mlp-repeat``): the noise floor."""

    semantics = "base"

    def __init__(self, name: str = "base-mlp"):
        self.name = name

    def bind(self, p, i):
        s, w = p.sets[i], p.sets[i].weights
        return Bound(lambda: F.linear(F.silu(F.linear(s.x, w["gate_proj_weight"])) * F.linear(s.x, w["up_proj_weight"]),
                                      w["down_proj_weight"]), {"x": s.x})


class TwoFFN(Provider):
    """Two whole FFN evaluations per token, as the MoE-CL reference code runs them (PEFT-style
    LoRA on each projection of each expert's MLP, mixed by the gate after the down projection)."""

    name, semantics = "two-ffn", "moe"

    def bind(self, p, i):
        s = p.sets[i]
        rt = p.routing
        off = [int(v) for v in rt.offsets_cpu.tolist()]
        groups = [(e, rt.sorted_idx[a:b].long()) for e, (a, b) in enumerate(zip(off[:-1], off[1:])) if b > a]
        has = (rt.token_task >= 0).unsqueeze(1)
        L, W = s.lora, s.weights

        def proj(z, name, e):
            A, B = (L[f"{name}_shared_A"], L[f"{name}_shared_B"]) if e is None else (L[f"{name}_task_A"][e],
                                                                                       L[f"{name}_task_B"][e])
            return F.linear(z, W[f"{name}_weight"]) + p.scale * F.linear(F.linear(z, A), B)

        def ffn(z, e):
            return proj(F.silu(proj(z, "gate_proj", e)) * proj(z, "up_proj", e), "down_proj", e)

        def forward():
            x = s.x
            beta = torch.softmax(F.linear(x, L["moe_gate"]).float(), dim=-1)
            c_s = torch.where(has, beta[:, :1], torch.ones_like(beta[:, :1])).to(x.dtype)
            y = c_s * ffn(x, None)
            for e, idx in groups:
                y = y.index_add(0, idx, beta[idx, 1:].to(x.dtype) * ffn(x.index_select(0, idx), e))
            return y

        return Bound(forward, _lora_targets(s))


class FfnOp(OpBackend):
    """``moe_lora_mlp(..., backend=name)``: the FFN-level op on the eager or triton backend
    (skips as the linear op's providers do)."""

    def bind(self, p, i):
        s = p.sets[i]

        def forward():
            return moe_lora_mlp(s.x, p.routing, activation=p.activation, scale=p.scale, backend=self.name,
                                **s.weights, **s.lora)[0]

        return Bound(forward, _lora_targets(s))


def ffn_providers(names: Optional[list[str]] = None) -> list[Provider]:
    provs = [BaseMLP(), BaseMLP("base-mlp-repeat"), TwoFFN(), FfnOp("eager"), FfnOp("triton")]
    return provs if names is None else [pr for pr in provs if pr.name in names]

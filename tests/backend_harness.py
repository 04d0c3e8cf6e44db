"""The backend-level test harness every backend is held to (tests/test_conformance.py and the
per-backend files): cases, fresh random inputs, the float64 reference (outputs, saved tensors,
gradients), one backend run through the contract (FwdArgs -> forward -> BwdArgs -> backward)
and the one tolerance table:

    float64            relative error <= 1e-10
    float32            relative error <= 1e-5, or 2x eager's error on the same draw where that is larger
    float16, bfloat16  at most 2x the eager backend's relative error in the same dtype
                       (floor: eps of the dtype. A correctly computed result is still rounded
                       to the dtype, once or twice, and on a tensor of a few elements -- the
                       gate gradient is 2 x d_in -- eager's own roundings can land much closer
                       by luck: seen at 5.4e-4 vs an eager error of 1.5e-4 in fp16 with
                       d_in = 3. A real defect (a missed term, a wrong expert or mask) is far
                       above eps.)

Relative error is the norm ratio ||got - ref|| / ||ref|| per tensor (helpers.rel_err; a zero
reference needs an exact zero).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

import torch
from helpers import op_inputs, rel_err, token_tasks

from moecl_kernels.contract import SINGLE_MIXED, BwdArgs, FwdArgs, moe_lora_reference
from moecl_kernels.contract import dropout as D
from moecl_kernels.routing import Routing, build_routing

TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5}  # absolute contract; low precision: relative to eager

EPS = {torch.float32: 2.0**-23, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}
GRADS = ("dx", "dA_s", "dB_s", "dA", "dB", "dgate")



# ---------------------------------------------------------------------------------------------
# cases


@dataclass(frozen=True)
class Case:
    T: int = 37
    d_in: int = 29
    d_out: int = 23
    r: int = 5
    E: int = 3
    routing: str = "partial"  # helpers.ROUTINGS, or single_grouped: one task but no host hint
    gate: bool = True
    bias: bool = True
    p: float = 0.1
    scale: float = 2.0

    def __str__(self):
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return "-".join(f"{k}={v}" for k, v in d.items() if v != getattr(Case, k)) or "default"


@dataclass
class Inputs:
    c: Case
    x64: dict  # float64 copies of the dtype inputs (the reference's inputs)
    x: dict  # the op inputs in dtype on the device
    tt: torch.Tensor
    ro: Routing
    gy64: torch.Tensor
    gy: torch.Tensor
    seed: int
    seed_t: torch.Tensor  # the same seed as the op takes it: 0-dim int64 on the device (refilled in place by tests)


def make_inputs(c: Case, dtype, device="cpu", seed: Optional[int] = None) -> Inputs:
    """Fresh random inputs (a new seed per call unless given)."""
    seed = int(torch.randint(0, 2**31, (1,))) if seed is None else seed
    inp, g = op_inputs(c.T, c.d_in, c.d_out, c.r, c.E, dtype=dtype, bias=c.bias, gate=c.gate, seed=seed,
                       device=device)
    x = {k: (v.detach() if v is not None else None) for k, v in inp.items()}
    x64 = {k: (v.double().cpu() if v is not None else None) for k, v in x.items()}
    tt = token_tasks("single" if c.routing == "single_grouped" else c.routing, c.T, c.E, g)
    ro = build_routing(tt, c.E, c.T, device=device)
    if c.routing == "single_grouped":  # exercises the grouped path with one expert
        ro.single_task, ro.offsets_cpu = SINGLE_MIXED, None
    gy = torch.randn(c.T, c.d_out, generator=g, dtype=torch.float64).to(dtype)
    drop_seed = int(torch.randint(0, 2**32, (1,), generator=g))
    return Inputs(c, x64, x, tt, ro, gy.double(), gy.to(device), drop_seed, torch.tensor(drop_seed, device=device))


def fwd_args(inp: Inputs) -> FwdArgs:
    ro = inp.ro
    return FwdArgs(**inp.x, token_task=ro.token_task, sorted_idx=ro.sorted_idx, expert_offsets=ro.expert_offsets,
                   offsets_cpu=ro.offsets_cpu, single_task=ro.single_task, scale=inp.c.scale,
                   dropout_p=inp.c.p, seed=inp.seed_t)


def bwd_args(inp: Inputs, saved, **kw) -> BwdArgs:
    return BwdArgs(**fwd_args(inp).__dict__, grad_y=inp.gy, h_s=saved[1], h_t=saved[2], coef=saved[3], **kw)


def reference(inp: Inputs) -> dict:
    """float64 forward outputs, saved tensors (base.py semantics) and gradients."""
    c, m = inp.c, inp.x64
    leaf = {k: (v.clone().requires_grad_(k not in ("weight", "bias")) if v is not None else None) for k, v in m.items()}
    y = moe_lora_reference(**leaf, token_task=inp.tt, scale=c.scale, dropout_p=c.p, seed=inp.seed)
    y.backward(inp.gy64)
    out = dict(y=y.detach())
    xd = D.apply_dropout(m["x"], c.p, inp.seed)
    has = (inp.tt >= 0)[:, None]
    out["h_s"] = xd @ m["shared_A"].T
    out["h_t"] = torch.einsum("ti,tri->tr", xd, m["task_A"][inp.tt.clamp(min=0)]) * has
    beta = torch.softmax(m["x"] @ m["gate_weight"].T, -1) if c.gate else torch.ones(c.T, 2, dtype=torch.float64)
    out["coef"] = torch.where(has, beta, torch.tensor([1.0, 0.0], dtype=torch.float64))
    for name, k in zip(GRADS, ("x", "shared_A", "shared_B", "task_A", "task_B", "gate_weight")):
        out[name] = leaf[k].grad if leaf[k] is not None else None
    return out


def run(backend, inp: Inputs, **bwd_kw) -> dict:
    saved = backend.forward(fwd_args(inp))
    grads = backend.backward(bwd_args(inp, saved, **bwd_kw))
    return dict(zip(("y", "h_s", "h_t", "coef"), saved)) | dict(zip(GRADS, grads))


def tolerance(dtype: torch.dtype, eager: Optional[torch.Tensor], ref: torch.Tensor) -> float:
    """The tolerance table (module docstring) for one tensor: the dtype's floor, or 2x eager's error on
    the same draw where that is larger (a tiny, cancelling reduction -- a [1, 2] gate gradient -- can put
    eager itself near the floor: seen at 1.39e-5 in fp32). fp16 / bf16 need ``eager``."""
    if eager is None:
        if dtype not in TOLERANCE:
            raise ValueError(f"the {dtype} tolerance is relative to eager's error: pass the eager result")
        return TOLERANCE[dtype]
    return max(2 * rel_err(eager.cpu(), ref), TOLERANCE.get(dtype, EPS[dtype]))


def check(got: dict, eager: Optional[dict], ref: dict, dtype, names=None, what=""):
    """Every output finite and within the tolerance table (module docstring); ``eager``: the
    eager backend's outputs on the same inputs (needed for fp16 / bf16 only)."""
    for k in names or ref:
        if ref[k] is None:
            assert got[k] is None, f"{what}{k}: expected None"
            continue
        assert got[k] is not None, f"{what}{k}: missing"
        assert torch.isfinite(got[k]).all(), f"{what}{k}: non-finite values (unwritten output?)"
        e = rel_err(got[k].cpu(), ref[k])
        tol = tolerance(dtype, eager[k] if eager is not None else None, ref[k])
        assert e <= tol, f"{what}{k}: relative error {e:.3g} > {tol:.3g}"

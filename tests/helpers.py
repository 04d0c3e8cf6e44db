"""Shared test helpers: random op inputs, routing patterns, error metrics."""

from __future__ import annotations

import torch

ROUTINGS = ("single", "mixed", "skewed", "none", "partial")
# the op test matrix shared by every backend's tests: odd sizes (T, d_in, d_out), d_in != d_out,
# and every (r, E) of r in {1, 8, 64} x E in {1, 4, 32}
SIZES = [(37, 29, 23), (64, 48, 33), (5, 7, 3)]
RANK_EXPERTS = [(r, E) for r in (1, 8, 64) for E in (1, 4, 32)]


def token_tasks(kind: str, T: int, E: int, g: torch.Generator) -> torch.Tensor:
    """Per-token task ids for a routing pattern (CPU int64)."""
    if kind == "single":
        return torch.full((T,), int(torch.randint(0, E, (1,), generator=g)))
    if kind == "mixed":
        return torch.randint(0, E, (T,), generator=g)
    if kind == "skewed":  # zipf-like: task 0 dominates, a long tail of rare tasks
        w = 1.0 / torch.arange(1, E + 1, dtype=torch.float64) ** 2
        return torch.multinomial(w, T, replacement=True, generator=g)
    if kind == "none":
        return torch.full((T,), -1)
    if kind == "partial":  # mixed with ~1/3 of the tokens without a task
        t = torch.randint(0, E, (T,), generator=g)
        return torch.where(torch.rand(T, generator=g) < 0.33, torch.full_like(t, -1), t)
    raise ValueError(kind)


def op_inputs(T, d_in, d_out, r, E, dtype=torch.float64, bias=True, gate=True, seed=0, device="cpu"):
    """Random x, weight, bias, shared/task experts and gate (all B non-zero), requiring grad where trainable."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0, grad=True):
        t = (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype=dtype, device=device)
        return t.requires_grad_(grad)

    return dict(
        x=rnd(T, d_in),
        weight=rnd(d_out, d_in, scale=d_in**-0.5, grad=False),
        bias=rnd(d_out, grad=False) if bias else None,
        shared_A=rnd(r, d_in, scale=d_in**-0.5),
        shared_B=rnd(d_out, r, scale=r**-0.5),
        task_A=rnd(E, r, d_in, scale=d_in**-0.5),
        task_B=rnd(E, d_out, r, scale=r**-0.5),
        gate_weight=rnd(2, d_in, scale=d_in**-0.5) if gate else None,
    ), g


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    a, ref = a.detach().double(), ref.detach().double()
    if not torch.isfinite(a).all():
        return float("inf")
    return float((a - ref).norm() / ref.norm().clamp(min=1e-300))


FFN_PROJ = ("gate_proj", "up_proj", "down_proj")


def ffn_inputs(T, d, d_ff, r, E, dtype=torch.float64, gated_mlp=True, moe_gate=True, bias=True, d_out=None, seed=0,
               device="cpu"):
    """Random x, base MLP weights/biases, shared/task LoRA per projection (all B non-zero) and the
    MoE gate, named as the FFN op's arguments; x and the adapters require grad."""
    g = torch.Generator().manual_seed(seed)
    d_out = d if d_out is None else d_out

    def rnd(*shape, scale=1.0, grad=True):
        t = (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype=dtype, device=device)
        return t.requires_grad_(grad)

    dims = {"gate_proj": (d, d_ff), "up_proj": (d, d_ff), "down_proj": (d_ff, d_out)}
    out = {"x": rnd(T, d)}
    for p in FFN_PROJ:
        if p == "gate_proj" and not gated_mlp:
            continue
        d_in, d_o = dims[p]
        out[f"{p}_weight"] = rnd(d_o, d_in, scale=d_in**-0.5, grad=False)
        out[f"{p}_bias"] = rnd(d_o, scale=0.5, grad=False) if bias else None
        out[f"{p}_shared_A"] = rnd(r, d_in, scale=d_in**-0.5)
        out[f"{p}_shared_B"] = rnd(d_o, r, scale=r**-0.5)
        out[f"{p}_task_A"] = rnd(E, r, d_in, scale=d_in**-0.5)
        out[f"{p}_task_B"] = rnd(E, d_o, r, scale=r**-0.5)
    out["moe_gate"] = rnd(2, d, scale=d**-0.5) if moe_gate else None
    return out, g


def check_dropout_seeding(module, x):
    """Dropout: off in eval; in training a fresh mask per call, drawn from torch's RNG (seeded runs repeat)."""
    tasks = [0, 1, 2, 0]
    module.eval()
    assert torch.equal(module(x, task_ids=tasks), module(x, task_ids=tasks))
    module.train()
    torch.manual_seed(5)
    y1 = module(x, task_ids=tasks)
    torch.manual_seed(5)
    y2 = module(x, task_ids=tasks)
    y3 = module(x, task_ids=tasks)
    assert torch.equal(y1, y2) and not torch.equal(y1, y3)

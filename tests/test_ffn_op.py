"""The FFN-level op (docs/spec.md §1.3): the eager backend and the op's autograd against the
float64 reference (two whole FFN evaluations per token), the custom ops, fallbacks, errors."""

from __future__ import annotations

import itertools
import warnings

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from helpers import RANK_EXPERTS, ROUTINGS, ffn_inputs, rel_err, token_tasks
from moecl_kernels import backends as bk
from moecl_kernels.contract.ffn_args import ACTIVATIONS, FFN_GRAD_INPUTS, FfnBwdArgs, FfnFwdArgs
from moecl_kernels.contract.ffn_reference import moe_lora_mlp_reference, pooled_ffn_reference
from moecl_kernels.ops.custom_ops import MLP_OP, call_args
from moecl_kernels.ops.ffn import moe_lora_mlp
from moecl_kernels.routing import build_routing

pytestmark = pytest.mark.usefixtures("poison_uninitialized_memory")  # tests/conftest.py

FFN_SIZES = [(13, 7, 11), (37, 16, 29), (5, 9, 6)]  # (T, d, d_ff): odd, d_ff > d, d_ff < d


def run_ffn(T, d, d_ff, r, E, routing, moe_gate=True, p=0.0, dtype=torch.float64, act="silu", gated_mlp=True,
            backend="eager", seed=0, trainable=None, bias=True, pool=False, d_out=None):
    """(op outputs and grads, reference outputs and grads) by name, for one random case."""
    inp, g = ffn_inputs(T, d, d_ff, r, E, dtype=dtype, gated_mlp=gated_mlp, moe_gate=moe_gate, bias=bias, seed=seed,
                        d_out=d_out)
    tt = token_tasks(routing, T, E, g)
    B = 1 if T % 2 else 2
    pool_w = torch.rand(B, T // B, generator=g, dtype=torch.float64) if pool else None
    if pool:
        pool_w = pool_w / pool_w.sum(1, keepdim=True)
    R = build_routing(tt, E, T)
    x = inp.pop("x")
    kw = dict(activation=act, scale=1.7, dropout_p=p)
    y, h_pool, z_pool = moe_lora_mlp(x, R, **kw, seed=torch.tensor(1234 + seed), pool=pool_w, backend=backend,
                                     expert_trainable=trainable, **inp)
    ref_in = {k: (v.detach().double().requires_grad_(v.requires_grad) if v is not None else None) for k, v in inp.items()}
    x_ref = x.detach().double().requires_grad_(True)
    parts = moe_lora_mlp_reference(x_ref, **ref_in, token_task=tt, **kw, seed=1234 + seed, pool=pool_w, parts=True)
    gy = torch.randn(y.shape, generator=g, dtype=torch.float64)
    outs, outs_ref, gys = [y], [parts["y"]], [gy.to(dtype)]
    out = {"y": (y, parts["y"])}
    if pool:
        # p_n = masked mean of FFN_shared(x), from the pooled h_shared and z_shared (no T x d GEMM)
        p_op = (h_pool.to(dtype) @ inp["down_proj_weight"].T + inp["down_proj_bias"]
                + 1.7 * z_pool.to(dtype) @ inp["down_proj_shared_B"].T)
        p_ref = pooled_ffn_reference(parts["ffn_s"], pool_w)
        gp = torch.randn(p_op.shape, generator=g, dtype=torch.float64)
        outs.append(p_op)
        outs_ref.append(p_ref)
        gys.append(gp.to(dtype))
        out["pooled"] = (p_op, p_ref)
    names = ["x"] + [n for n, v in inp.items() if v is not None and v.requires_grad]
    grads = torch.autograd.grad(outs, [x] + [inp[n] for n in names[1:]], gys, allow_unused=True)
    grads_ref = torch.autograd.grad(outs_ref, [x_ref] + [ref_in[n] for n in names[1:]], [t.double() for t in gys],
                                    allow_unused=True)
    for n, a, b in zip(names, grads, grads_ref):
        b = torch.zeros_like(a if a is not None else inp[n]).double() if b is None else b
        if "_task_" in n and trainable is not None:
            b = b.clone()
            b[[not t for t in trainable]] = 0
        out[n] = (a, b)
    return out, R


def check(out: dict, tol: float) -> None:
    for name, (a, b) in out.items():
        if b.abs().max() == 0:  # e.g. task grads with no task tokens, gate grads without a task
            assert a is None or a.abs().max() == 0, name
            continue
        assert rel_err(a, b) <= tol, f"{name}: {rel_err(a, b):.3e}"


# every (r, E) x routing x gate; dropout, dtype, activation and MLP kind alternate across them
CASES = [
    (FFN_SIZES[i % 3], r, E, routing, gate, (0.0, 0.1)[i % 2], (torch.float64, torch.float32)[i // 2 % 2],
     ACTIVATIONS[i % len(ACTIVATIONS)], i % 5 != 4)
    for i, ((r, E), routing, gate) in enumerate(itertools.product(RANK_EXPERTS, ROUTINGS, (True, False)))
]


@pytest.mark.parametrize("size,r,E,routing,gate,p,dtype,act,gated_mlp", CASES)
def test_eager_matches_reference(size, r, E, routing, gate, p, dtype, act, gated_mlp):
    T, d, d_ff = size
    seed = hash((size, r, E, routing, gate, p)) % 10_000
    out, _ = run_ffn(T, d, d_ff, r, E, routing, gate, p, dtype, act, gated_mlp, seed=seed)
    check(out, 1e-10 if dtype == torch.float64 else 1e-5)


@pytest.mark.parametrize("act", ACTIVATIONS)
@pytest.mark.parametrize("gated_mlp", [True, False])
def test_activations_and_pooled_outputs(act, gated_mlp):
    out, _ = run_ffn(24, 10, 17, 4, 3, "partial", True, 0.2, torch.float64, act, gated_mlp, pool=True, seed=5)
    check(out, 1e-10)


@pytest.mark.parametrize("backend", ["eager", "reference"])
@pytest.mark.parametrize("routing", ["mixed", "single", "partial"])
def test_frozen_experts_get_zero_grad(routing, backend):
    trainable = [True, False, False, True]
    out, _ = run_ffn(40, 12, 20, 4, 4, routing, True, 0.1, torch.float64, trainable=trainable, backend=backend)
    check(out, 1e-10)
    for n in (n for n in out if "_task_" in n):
        assert torch.all(out[n][0][[1, 2]] == 0), n


@pytest.mark.parametrize("routing", ["none", "single"])
def test_decode_no_bias_and_d_out(routing):
    for T in (1, 2):
        out, _ = run_ffn(T, 9, 13, 3, 2, routing, True, 0.0, bias=False, d_out=5)
        check(out, 1e-10)


def test_zero_B_is_bit_exact_with_the_base_mlp():
    """B = 0: the op computes exactly act(x W_g^T) * (x W_u^T) then W_down (the model's own ops)."""
    inp, g = ffn_inputs(19, 12, 20, 4, 3, dtype=torch.float32)
    with torch.no_grad():
        for n, v in inp.items():
            if n.endswith(("_B",)):
                v.zero_()
    tt = token_tasks("partial", 19, 3, g)
    x = inp.pop("x")
    y, _, _ = moe_lora_mlp(x, build_routing(tt, 3, 19), activation="silu", scale=2.0, **inp)
    lin = torch.nn.functional.linear
    base = lin(torch.nn.functional.silu(lin(x, inp["gate_proj_weight"], inp["gate_proj_bias"]))
               * lin(x, inp["up_proj_weight"], inp["up_proj_bias"]), inp["down_proj_weight"], inp["down_proj_bias"])
    assert torch.equal(y, base)


def _backward_flops(trainable):
    """FLOPs of the eager FFN backward (called directly: the op is opaque to the counter)."""
    from moecl_kernels.backends.eager import EagerBackend

    inp, _ = ffn_inputs(64, 32, 48, 4, 4, dtype=torch.float32, seed=3)
    inp = {k: v.detach() if v is not None else None for k, v in inp.items()}
    R = build_routing(torch.arange(64) % 4, 4, 64)  # every expert present, 16 tokens each
    fa = FfnFwdArgs(**inp, token_task=R.token_task, sorted_idx=R.sorted_idx, expert_offsets=R.expert_offsets,
                    offsets_cpu=R.offsets_cpu, single_task=R.single_task, pool=None, activation="silu", scale=2.0,
                    dropout_p=0.0, seed=None)
    be = EagerBackend()
    y, g, u, a_s, a_t, z_s, z_t, coef, _, _ = be.ffn_forward(fa)
    a = FfnBwdArgs(**fa.__dict__, grad_y=torch.ones_like(y), g=g, u=u, a_s=a_s, a_t=a_t, z_s=z_s, z_t=z_t, coef=coef,
                   expert_trainable=trainable)
    with FlopCounterMode(display=False) as fc:
        be.ffn_backward(a)
    return fc.get_total_flops()


def test_frozen_experts_cost_no_compute():
    saved = _backward_flops([True] * 4) - _backward_flops([True, False, True, False])
    # each frozen expert present skips dA of gate+up (2*n*2r*d), dB of gate/up (2 * 2*n*d_ff*r),
    # dA_down (2*n*r*d_ff) and dB_down (2*n*d*r): n = 16, r = 4, d = 32, d_ff = 48
    n, r, d, d_ff = 16, 4, 32, 48
    per_expert = 2 * n * 2 * r * d + 2 * (2 * n * d_ff * r) + 2 * n * r * d_ff + 2 * n * d * r
    assert saved == 2 * per_expert


def _small(gate=True, gated_mlp=True, pool=False):
    inp, g = ffn_inputs(8, 5, 7, 2, 3, gated_mlp=gated_mlp, moe_gate=gate, seed=11)
    R = build_routing(torch.tensor([0, 2, -1, 1, 1, 0, 2, -1]), 3, 8)
    pool_w = torch.full((2, 4), 0.25, dtype=torch.float64) if pool else None
    return inp, R, pool_w


@pytest.mark.parametrize("gated_mlp", [True, False])
def test_gradcheck_fp64(gated_mlp):
    inp, R, pool_w = _small(gated_mlp=gated_mlp, pool=True)
    names = [n for n, v in inp.items() if v is not None and v.requires_grad]
    rest = {n: v for n, v in inp.items() if n not in names}

    def f(*ts):
        kw = dict(rest, **dict(zip(names, ts)))
        y, hp, zp = moe_lora_mlp(kw.pop("x"), R, activation="gelu_tanh", scale=1.3, dropout_p=0.2,
                                 seed=torch.tensor(99), pool=pool_w, **kw)
        return y, hp, zp

    assert torch.autograd.gradcheck(f, tuple(inp[n] for n in names), eps=1e-6, atol=1e-8, fast_mode=True)


def _fwd_values(inp, R, pool_w, p=0.2, backend="eager", trainable=(True, True, True)):
    d = {k: v.detach() if v is not None else None for k, v in inp.items()}
    fa = FfnFwdArgs(**{n: d.get(n) for n in FfnFwdArgs.__dataclass_fields__ if n in d or n.startswith("gate_proj")},
                    token_task=R.token_task, sorted_idx=R.sorted_idx, expert_offsets=R.expert_offsets,
                    offsets_cpu=R.offsets_cpu, single_task=R.single_task, pool=pool_w, activation="silu", scale=1.3,
                    dropout_p=p, seed=torch.tensor(5))
    return fa, dict(fa.__dict__, expert_trainable=list(trainable), deterministic=False, backend=backend)


@pytest.mark.parametrize("gate,gated_mlp,pool", [(True, True, True), (False, True, False), (True, False, False)])
def test_opcheck(gate, gated_mlp, pool):
    inp, R, pool_w = _small(gate, gated_mlp, pool)
    fa, kw = _fwd_values(inp, R, pool_w)
    fwd_args = call_args(MLP_OP.fwd_schema_args, **kw)
    torch.library.opcheck(MLP_OP.fwd._opoverload, fwd_args)
    out = MLP_OP.fwd(*fwd_args)
    saved = dict(zip(("g", "u", "a_s", "a_t", "z_s", "z_t", "coef"), out[1:8]))
    grads = dict(grad_y=torch.randn_like(out[0]), grad_h_pool=torch.randn_like(out[8]) if pool else None,
                 grad_z_pool=torch.randn_like(out[9]) if pool else None)
    bwd_args = call_args(MLP_OP.bwd_schema_args, **kw, **saved, **grads, needs_dx=True, needs_shared=True,
                         needs_task=True, needs_gate=gate)
    torch.library.opcheck(MLP_OP.bwd._opoverload, bwd_args)


def test_any_backend_backward_consumes_any_forward():
    """The saved tensors are fully specified: the reference's backward on the eager forward's
    outputs (and vice versa) gives the same gradients."""
    inp, R, pool_w = _small(pool=True)
    fa, kw = _fwd_values(inp, R, pool_w)
    outs = {b: bk.backend(b).ffn_forward(fa) for b in ("eager", "reference")}
    for n in range(10):
        assert rel_err(outs["eager"][n], outs["reference"][n]) < 1e-12 or outs["reference"][n].numel() == 0, n
    gy, ghp, gzp = (torch.randn_like(outs["eager"][i]) for i in (0, 8, 9))
    grads = {}
    for fb, bb in itertools.product(("eager", "reference"), repeat=2):
        o = outs[fb]
        a = FfnBwdArgs(**fa.__dict__, grad_y=gy, grad_h_pool=ghp, grad_z_pool=gzp, g=o[1], u=o[2], a_s=o[3], a_t=o[4],
                       z_s=o[5], z_t=o[6], coef=o[7])
        grads[fb, bb] = bk.backend(bb).ffn_backward(a)
    for key, gs in grads.items():
        for n, a, b in zip(FFN_GRAD_INPUTS, gs, grads["reference", "reference"]):
            assert rel_err(a, b) < 1e-10 or b.abs().max() == 0, (key, n)


def test_backend_without_ffn_kernels_falls_back_to_eager_once():
    class LinearOnly:
        name, priority = "linear_only", -5

        def unavailable_reason(self, x):
            return None

        forward = backward = None

    bk.register_backend("linear_only", LinearOnly)
    try:
        inp, R, _ = _small()
        x = inp.pop("x")
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            y1, _, _ = moe_lora_mlp(x, R, activation="silu", scale=1.0, backend="linear_only", **inp)
            y2, _, _ = moe_lora_mlp(x, R, activation="silu", scale=1.0, backend="linear_only", **inp)
        msgs = [str(m.message) for m in w if "FFN-level" in str(m.message)]
        assert len(msgs) == 1 and "'linear_only'" in msgs[0] and "'eager'" in msgs[0]
        y_e, _, _ = moe_lora_mlp(x, R, activation="silu", scale=1.0, backend="eager", **inp)
        assert torch.equal(y1, y_e) and torch.equal(y2, y_e)
    finally:
        bk._factories.pop("linear_only", None)
        bk._instances.pop("linear_only", None)


@pytest.mark.parametrize("change,match", [
    (dict(up_proj_weight=torch.zeros(7, 4)), r"up_proj_weight must be \[d_ff, d=5\]"),
    (dict(down_proj_shared_A=torch.zeros(2, 6)), r"down_proj_shared_A must be \[2, 7\]"),
    (dict(gate_proj_task_B=None), r"gate_proj_task_B is required"),
    (dict(moe_gate=torch.zeros(3, 5)), r"moe_gate must be \[2, d=5\]"),
    (dict(up_proj_task_A=torch.zeros(3, 2, 5, dtype=torch.float32)), "up_proj_task_A has dtype torch.float32"),
    (dict(activation="swiglu"), "activation='swiglu' is not supported"),
    (dict(pool=torch.ones(3, 3)), r"pool must be \[B, S\]"),
    (dict(bogus=torch.ones(1)), "unexpected arguments"),
])
def test_errors_name_the_argument(change, match):
    inp, R, _ = _small()
    kw = dict(inp, activation="silu", scale=1.0)
    kw.update(change)
    x = kw.pop("x")
    with pytest.raises((ValueError, TypeError), match=match):
        moe_lora_mlp(x, R, **kw)


def test_plain_mlp_rejects_gate_projection_lora_and_ungated_pooling():
    inp, R, _ = _small(gated_mlp=False)
    x = inp.pop("x")
    with pytest.raises(ValueError, match="gate_proj_shared_A is given but gate_proj_weight is None"):
        moe_lora_mlp(x, R, activation="gelu", scale=1.0, gate_proj_shared_A=inp["up_proj_shared_A"], **inp)
    inp, R, pool_w = _small(gate=False, pool=True)
    x = inp.pop("x")
    with pytest.raises(ValueError, match="pool needs a gated MLP"):
        moe_lora_mlp(x, R, activation="gelu", scale=1.0, pool=pool_w, **inp)


@pytest.mark.parametrize("level", ["ffn", "linear"])
@pytest.mark.parametrize("p", [0.0, 0.1])
def test_workspace_buffers_never_escape_a_call(level, p):
    """The eager CPU workspace reuses large temporaries across calls: nothing a call returns or
    saves for backward may live in them, so a second call (other inputs, same shapes) leaves the
    first call's outputs and gradients unchanged."""
    from helpers import op_inputs
    from moecl_kernels.ops.linear import moe_lora_linear

    def call(seed):
        torch.manual_seed(seed)
        T, E = 96, 3  # T x d_ff fp32 temporaries above the workspace's 64 KiB floor
        if level == "ffn":
            inp, g = ffn_inputs(T, 24, 200, 4, E, dtype=torch.float32, seed=seed)
            x = inp.pop("x")
            R = build_routing(token_tasks("mixed", T, E, g), E, T)
            outs = moe_lora_mlp(x, R, activation="silu", scale=1.7, dropout_p=p, seed=torch.tensor(seed),
                                backend="eager", **inp)
            y = outs[0]
        else:
            inp, g = op_inputs(T, 200, 180, 4, E, dtype=torch.float32, seed=seed)
            x = inp["x"]
            R = build_routing(token_tasks("mixed", T, E, g), E, T)
            y = moe_lora_linear(**inp, routing=R, scale=1.7, dropout_p=p, seed=torch.tensor(seed), backend="eager")
        leaves = [x] + [v for v in inp.values() if v is not None and v.requires_grad and v is not x]
        grads = torch.autograd.grad(y, leaves, torch.randn_like(y))
        return [y.detach(), *grads]

    first = call(1)
    kept = [t.clone() for t in first]
    call(2)
    call(3)
    for a, b in zip(first, kept):
        assert torch.equal(a, b)


def test_ffn_inference_calls_skip_the_custom_op_dispatch(monkeypatch):
    """As the linear op: without autograd or a dispatch mode watching, moe_lora_mlp calls the
    backend directly (decode's host cost); the result equals the custom op's."""
    from torch.utils.flop_counter import FlopCounterMode

    from moecl_kernels.ops import ffn as op_module

    inp, g = ffn_inputs(6, 8, 12, 2, 3, dtype=torch.float32)
    x = inp.pop("x")
    R = build_routing(token_tasks("mixed", 6, 3, g), 3, 6)
    calls = []
    real = op_module.moe_lora_mlp_fwd
    monkeypatch.setattr(op_module, "moe_lora_mlp_fwd", lambda *a: calls.append(1) or real(*a))
    kw = dict(activation="silu", scale=1.3)
    with torch.no_grad():
        y_direct = moe_lora_mlp(x, R, **kw, **inp)[0]
    assert calls == []
    y_op = moe_lora_mlp(x, R, **kw, **inp)[0]  # the adapters require grad: through the op
    assert calls == [1] and y_op.requires_grad
    assert torch.equal(y_direct, y_op.detach())
    with torch.no_grad(), FlopCounterMode(display=False):
        moe_lora_mlp(x, R, **kw, **inp)
    assert calls == [1, 1]

"""Eager-specific tests of the op (frozen experts, dropout, gradcheck, opcheck, host syncs); the
matrix of every backend against the float64 reference is tests/test_conformance.py."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from helpers import ROUTINGS, op_inputs, rel_err, token_tasks
from moecl_kernels.ops import dropout_mask, moe_lora_linear, moe_lora_reference
from moecl_kernels.routing import build_routing

pytestmark = pytest.mark.usefixtures("poison_uninitialized_memory")  # tests/conftest.py

GRAD_NAMES = ("x", "shared_A", "shared_B", "task_A", "task_B", "gate_weight")


def run_case(T, d_in, d_out, r, E, routing, gate, p, dtype, backend="eager", seed=0, trainable=None, bias=True):
    inp, g = op_inputs(T, d_in, d_out, r, E, dtype=dtype, gate=gate, seed=seed, bias=bias)
    tt = token_tasks(routing, T, E, g)
    R = build_routing(tt, E, T)
    drop_seed = torch.tensor(1234 + seed)
    y = moe_lora_linear(**inp, routing=R, scale=1.7, dropout_p=p, seed=drop_seed, backend=backend,
                        expert_trainable=trainable)
    ref_in = {k: (v.detach().double().requires_grad_(v.requires_grad) if v is not None else None) for k, v in inp.items()}
    y_ref = moe_lora_reference(**ref_in, token_task=tt, scale=1.7, dropout_p=p, seed=1234 + seed)
    gy = torch.randn(y.shape, generator=g, dtype=torch.float64)
    names = [n for n in GRAD_NAMES if inp[n] is not None]
    grads = torch.autograd.grad(y, [inp[n] for n in names], gy.to(dtype))
    grads_ref = torch.autograd.grad(y_ref, [ref_in[n] for n in names], gy)
    out = {"y": (y, y_ref)}
    for n, a, b in zip(names, grads, grads_ref):
        if n.startswith("task_") and trainable is not None:
            b = b.clone()
            b[[not t for t in trainable]] = 0
        out[n] = (a, b)
    return out, R


@pytest.mark.parametrize("routing", ROUTINGS)
@pytest.mark.parametrize("T", [1, 2])
def test_decode_sizes(T, routing):
    out, _ = run_case(T, 17, 13, 4, 3, routing, True, 0.0, torch.float64)
    for name, (a, b) in out.items():
        assert rel_err(a, b) <= 1e-10 or b.abs().max() == 0, name


def test_no_bias():
    out, _ = run_case(21, 19, 11, 3, 2, "mixed", True, 0.1, torch.float64, bias=False)
    for name, (a, b) in out.items():
        assert rel_err(a, b) <= 1e-10, name


@pytest.mark.parametrize("routing", ["mixed", "single", "partial"])
def test_frozen_experts_get_zero_grad(routing):
    trainable = [True, False, False, True]
    out, _ = run_case(40, 16, 12, 4, 4, routing, True, 0.1, torch.float64, trainable=trainable)
    for n in ("task_A", "task_B"):
        a, b = out[n]
        assert torch.all(a[[1, 2]] == 0), n
        assert rel_err(a, b) <= 1e-10 or b.abs().max() == 0


def _backward_flops(trainable):
    """FLOPs of the eager backend's backward (called directly: the op itself is opaque to the counter)."""
    from moecl_kernels.contract import BwdArgs
    from moecl_kernels.backends.eager import EagerBackend
    from moecl_kernels.contract import FwdArgs

    inp, g = op_inputs(64, 32, 24, 4, 4, dtype=torch.float32, seed=3)
    inp = {k: v.detach() if v is not None else None for k, v in inp.items()}
    R = build_routing(torch.arange(64) % 4, 4, 64)  # every expert present, 16 tokens each
    fa = FwdArgs(**inp, token_task=R.token_task, sorted_idx=R.sorted_idx, expert_offsets=R.expert_offsets,
                 offsets_cpu=R.offsets_cpu, single_task=R.single_task, scale=2.0, dropout_p=0.0, seed=None)
    be = EagerBackend()
    y, h_s, h_t, coef = be.forward(fa)
    a = BwdArgs(**fa.__dict__, grad_y=torch.ones_like(y), h_s=h_s, h_t=h_t, coef=coef, expert_trainable=trainable)
    with FlopCounterMode(display=False) as fc:
        be.backward(a)
    return fc.get_total_flops()


def test_frozen_experts_cost_no_compute():
    all_flops = _backward_flops([True] * 4)
    two_frozen = _backward_flops([True, False, True, False])
    # each frozen expert present saves its dA (2*n*r*d_in) and dB (2*n*d_out*r) GEMMs: n = 16 tokens
    saved = 2 * (2 * 16 * 4 * 32 + 2 * 16 * 24 * 4)
    assert all_flops - two_frozen == saved


def test_task_grads_skipped_when_no_expert_trains():
    inp, g = op_inputs(20, 8, 6, 2, 3, dtype=torch.float64)
    inp["task_A"].requires_grad_(False)
    inp["task_B"].requires_grad_(False)
    R = build_routing(torch.randint(0, 3, (20,), generator=g), 3, 20)
    y = moe_lora_linear(**inp, routing=R, scale=1.0)
    y.sum().backward()
    assert inp["task_A"].grad is None and inp["shared_A"].grad is not None


@pytest.mark.parametrize("seed", [0, 7, 2**31 - 1, 2**31 + 5, 2**32 - 1, 2**40 + 3, -9])
@pytest.mark.parametrize("p", [0.05, 0.5, 0.999])
def test_fast_mask_is_the_formula_bit_for_bit(seed, p):
    """The int32 mask (wrap-around multiplies, chunked rows) equals the exact int64 formula, for
    int and tensor seeds, large row/column indices, and more rows than one chunk holds."""
    from moecl_kernels.contract import dropout as D

    rows = torch.cat([torch.arange(0, 700), torch.tensor([65535, 65536, 2**20 + 3, 2**31 - 1])])
    cols = torch.cat([torch.arange(0, 1500), torch.tensor([4095, 2**16 + 1, 2**24 - 1])])
    want = D.keep_mask_reference(seed, rows, cols, p)
    assert torch.equal(D.keep_mask(seed, rows, cols, p), want)
    assert torch.equal(D.keep_mask(torch.tensor(seed), rows, cols, p), want)
    assert torch.equal(D.dropout_mask(seed, 5, 3, p), D.keep_mask_reference(seed, torch.arange(5), torch.arange(3), p))
    assert D.dropout_mask(seed, 0, 3, p).shape == (0, 3)


def test_dropout_bad_input_named():
    from moecl_kernels.contract import dropout as D

    with pytest.raises(ValueError, match="dropout_p must be in"):
        D.dropout_mask(1, 4, 4, 1.0)
    with pytest.raises(ValueError, match="seed must be one integer"):
        D.dropout_mask(torch.tensor(float("nan")), 4, 4, 0.1)


def test_dropout_reproducible_and_seeded():
    m1 = dropout_mask(7, 300, 257, 0.1)
    m2 = dropout_mask(7, 300, 257, 0.1)
    m3 = dropout_mask(8, 300, 257, 0.1)
    assert torch.equal(m1, m2) and not torch.equal(m1, m3)
    assert abs(m1.float().mean().item() - 0.9) < 0.01
    # rows and columns are not correlated copies of each other
    assert not torch.equal(m1[0], m1[1]) and not torch.equal(m1[:, 0], m1[:, 1])
    inp, g = op_inputs(33, 20, 10, 4, 2, dtype=torch.float64)
    R = build_routing(torch.randint(0, 2, (33,), generator=g), 2, 33)
    ys = [moe_lora_linear(**inp, routing=R, scale=1.0, dropout_p=0.3, seed=torch.tensor(s)) for s in (5, 5, 6)]
    assert torch.equal(ys[0], ys[1]) and not torch.equal(ys[0], ys[2])


def _small_op_args(dtype=torch.float64, p=0.2, gate=True):
    inp, g = op_inputs(9, 6, 5, 2, 3, dtype=dtype, gate=gate, seed=11)
    R = build_routing(torch.tensor([0, 2, -1, 1, 1, 0, 2, -1, 0]), 3, 9)
    return inp, R, p


def test_gradcheck_fp64():
    inp, R, p = _small_op_args()
    names = [n for n in GRAD_NAMES if inp[n] is not None]

    def f(*ts):
        kw = dict(inp, **dict(zip(names, ts)))
        return moe_lora_linear(**kw, routing=R, scale=1.3, dropout_p=p, seed=torch.tensor(99))

    assert torch.autograd.gradcheck(f, tuple(inp[n] for n in names), eps=1e-6, atol=1e-8)


def _fwd_args(inp, R, p, backend="eager", trainable=(True, True, True)):
    from moecl_kernels.ops.custom_ops import FWD_SCHEMA_ARGS, call_args

    return call_args(FWD_SCHEMA_ARGS, **inp, token_task=R.token_task, sorted_idx=R.sorted_idx,
                     expert_offsets=R.expert_offsets, offsets_cpu=R.offsets_cpu, single_task=R.single_task, scale=1.3,
                     dropout_p=p, seed=torch.tensor(5), expert_trainable=list(trainable), deterministic=False,
                     backend=backend)  # the frozen-task fields default to None


@pytest.mark.parametrize("gate", [True, False])
def test_opcheck_forward(gate):
    inp, R, p = _small_op_args(gate=gate)
    torch.library.opcheck(torch.ops.moecl.moe_lora_fwd.default, _fwd_args(inp, R, p))


def test_opcheck_backward():
    inp, R, p = _small_op_args()
    y, h_s, h_t, coef = torch.ops.moecl.moe_lora_fwd(*_fwd_args({k: v.detach() if v is not None else None
                                                                 for k, v in inp.items()}, R, p))
    gy = torch.randn_like(y)
    from moecl_kernels.ops.custom_ops import BWD_SCHEMA_ARGS, call_args

    d = {k: v.detach() if v is not None else None for k, v in inp.items()}
    args = call_args(BWD_SCHEMA_ARGS, grad_y=gy, **d, token_task=R.token_task, sorted_idx=R.sorted_idx,
                     expert_offsets=R.expert_offsets, offsets_cpu=R.offsets_cpu, single_task=R.single_task,
                     h_s=h_s, h_t=h_t, coef=coef, scale=1.3, dropout_p=p, seed=torch.tensor(5), needs_dx=True,
                     needs_shared=True, needs_task=True, needs_gate=True, expert_trainable=[True, False, True],
                     deterministic=False, backend="eager")
    torch.library.opcheck(torch.ops.moecl.moe_lora_bwd.default, args)


def test_routing_on_device_tensor_path():
    # task ids given as a non-CPU-analysed tensor path: emulate by building from a "device" tensor on CPU
    inp, g = op_inputs(30, 12, 9, 3, 5, dtype=torch.float64)
    tt = token_tasks("partial", 30, 5, g)
    R = build_routing(tt, 5, 30)
    assert R.offsets_cpu is not None
    R_dev = build_routing(tt, 5, 30)
    R_dev.offsets_cpu, R_dev.single_task = None, -2  # what a CUDA task-id tensor yields
    y1 = moe_lora_linear(**inp, routing=R, scale=1.0)
    y2 = moe_lora_linear(**inp, routing=R_dev, scale=1.0)
    assert torch.equal(y1, y2)


@pytest.mark.parametrize("backend", ["eager", "reference"])
def test_frozen_gate_still_routes_dx_through_gate(backend):
    """W_g frozen (no dW_g wanted): dx must still include the gate's contribution."""
    inp, g = op_inputs(25, 14, 9, 3, 3, dtype=torch.float64, seed=21)
    inp["gate_weight"].requires_grad_(False)
    tt = token_tasks("partial", 25, 3, g)
    R = build_routing(tt, 3, 25)
    y = moe_lora_linear(**inp, routing=R, scale=1.5, backend=backend)
    x_ref = inp["x"].detach().clone().requires_grad_(True)
    y_ref = moe_lora_reference(**dict(inp, x=x_ref), token_task=tt, scale=1.5)
    gy = torch.randn(y.shape, generator=g, dtype=torch.float64)
    (dx,) = torch.autograd.grad(y, [inp["x"]], gy)
    (dx_ref,) = torch.autograd.grad(y_ref, [x_ref], gy)
    assert rel_err(dx, dx_ref) <= 1e-10


def test_dropout_seed_is_a_tensor_read_without_a_host_sync(monkeypatch):
    """The seed stays a tensor all the way down: refilling it in place changes the mask of the very
    same call (what a CUDA graph replay does), and nothing reads it on the host (.item())."""
    inp, R, p = _small_op_args(p=0.3)
    seed = torch.tensor(5)
    monkeypatch.setattr(torch.Tensor, "item", lambda self: pytest.fail("a host read of the seed (.item())"))
    ys = []
    for value in (5, 6):
        seed.fill_(value)
        ys.append(moe_lora_linear(**inp, routing=R, scale=1.3, dropout_p=p, seed=seed).detach())
    monkeypatch.undo()
    ref = [moe_lora_reference(**inp, token_task=R.token_task, scale=1.3, dropout_p=p, seed=v) for v in (5, 6)]
    assert not torch.equal(ys[0], ys[1])
    assert rel_err(ys[0], ref[0]) <= 1e-10 and rel_err(ys[1], ref[1]) <= 1e-10


@pytest.mark.parametrize("backend", ["eager", "reference"])
def test_backends_hash_the_seed_on_the_device(backend):
    """Forward and backward on the meta device (no data at all: a host read of any value raises):
    the eager and reference backends compute the dropout hash from the seed tensor."""
    from moecl_kernels import backends as bk
    from moecl_kernels.contract import BwdArgs, FwdArgs

    inp, g = op_inputs(6, 5, 4, 2, 3, dtype=torch.float32, seed=1)
    t = {k: (v.detach().to("meta") if v is not None else None) for k, v in inp.items()}
    R = build_routing(1, 3, 6)  # one task: no host offsets needed
    fa = FwdArgs(**t, token_task=R.token_task.to("meta"), sorted_idx=R.sorted_idx.to("meta"),
                 expert_offsets=R.expert_offsets.to("meta"), offsets_cpu=None, single_task=R.single_task, scale=1.0,
                 dropout_p=0.2, seed=torch.tensor(9, device="meta"))
    b = bk.backend(backend)
    y, h_s, h_t, coef = b.forward(fa)
    grads = b.backward(BwdArgs(**fa.__dict__, grad_y=torch.empty(6, 4, device="meta"), h_s=h_s, h_t=h_t, coef=coef))
    assert y.shape == (6, 4) and all(gr is None or gr.device.type == "meta" for gr in grads)


def test_seed_argument_errors_name_it():
    inp, R, p = _small_op_args()
    with pytest.raises(ValueError, match="seed is required when dropout_p > 0"):
        moe_lora_linear(**inp, routing=R, scale=1.0, dropout_p=0.1)
    with pytest.raises(ValueError, match="seed must be a 0-dim integer tensor"):
        moe_lora_linear(**inp, routing=R, scale=1.0, dropout_p=0.1, seed=torch.tensor(1.5))
    with pytest.raises(ValueError, match="seed must be a 0-dim integer tensor"):
        moe_lora_linear(**inp, routing=R, scale=1.0, dropout_p=0.1, seed=7)


def test_inference_calls_skip_the_custom_op_dispatch(monkeypatch):
    """Without autograd, a compiler or a dispatch mode watching, moe_lora_linear calls the backend
    directly (the custom op's dispatch is most of a decode call's host cost); the result is the same."""
    from moecl_kernels.ops import linear as op_module

    inp, R, _ = _small_op_args()
    calls = []
    real = op_module.moe_lora_fwd
    monkeypatch.setattr(op_module, "moe_lora_fwd", lambda *a: calls.append(1) or real(*a))
    with torch.no_grad():
        y_direct = moe_lora_linear(**inp, routing=R, scale=1.3)
    assert calls == []
    y_op = moe_lora_linear(**inp, routing=R, scale=1.3)  # the LoRA weights require grad: through the op
    assert calls == [1] and y_op.requires_grad
    assert torch.equal(y_direct, y_op.detach())
    with torch.no_grad(), FlopCounterMode(display=False):  # a dispatch mode sees the op, not its pieces
        moe_lora_linear(**inp, routing=R, scale=1.3)
    assert calls == [1, 1]
    with pytest.raises(ValueError, match=r"shared_B must be \[d_out=5, r=2\]"):  # the fast check defers to these
        moe_lora_linear(**dict(inp, shared_B=inp["shared_B"].t()), routing=R, scale=1.3)

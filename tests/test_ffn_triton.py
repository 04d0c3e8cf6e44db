"""The FFN-level op on the ``triton`` backend against the float64 reference (docs/spec.md §1.3).

CPU: the kernels run under the Triton interpreter (``TRITON_INTERPRET=1``, set by tests/conftest.py
before triton is imported). Standards as for the linear kernels (tests/test_triton_backend.py):
fresh random inputs, outputs poisoned before the kernels write them, odd sizes, r = 1, T = 1,
single / mixed / skewed / no-task routing, dropout, gate on and off, plain and gated MLPs, every
activation; a result in dtype ``dt`` may be at most 2x as far from the float64 reference as the
eager backend's result in ``dt`` (fp32: at most 1e-5 relative). bf16 needs a GPU (the
interpreter has no bf16 matmul): the ``gpu`` test.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import pytest
import torch

pytest.importorskip("triton")

from backend_harness import tolerance  # noqa: E402  (the one tolerance table)
from helpers import ffn_inputs, rel_err, token_tasks  # noqa: E402

from moecl_kernels.backends.eager import EagerBackend  # noqa: E402
from moecl_kernels.contract import SINGLE_MIXED  # noqa: E402
from moecl_kernels.contract.ffn_args import FFN_GRAD_INPUTS, FFN_POOLED, FFN_SAVED, FfnBwdArgs, FfnFwdArgs  # noqa: E402
from moecl_kernels.contract.ffn_reference import reference_ffn_backward, reference_ffn_forward  # noqa: E402
from moecl_kernels.routing import build_routing  # noqa: E402

tb = pytest.importorskip("moecl_kernels.backends.triton.backend")
from moecl_kernels.backends.triton import TritonBackend  # noqa: E402

ON_GPU = torch.cuda.is_available() and not tb.INTERPRETED
needs_interpreter = pytest.mark.skipif(torch.cuda.is_available() or not tb.INTERPRETED,
                                       reason="CPU tests need the Triton interpreter (TRITON_INTERPRET=1 before "
                                              "triton is imported: run this module in its own process)")
OUTS = ("y",) + FFN_SAVED + FFN_POOLED

pytestmark = [pytest.mark.usefixtures("poison_uninitialized_memory"),  # tests/conftest.py
              # tl.sigmoid of a large negative fp32 overflows exp to inf in the interpreter's numpy: 1/(1+inf) = 0, exact
              pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")]


@dataclass(frozen=True)
class Case:
    T: int = 23
    d: int = 13
    d_ff: int = 37
    r: int = 5
    E: int = 3
    routing: str = "partial"  # helpers.ROUTINGS, or single_grouped: one task, no host hint
    moe_gate: bool = True
    gated_mlp: bool = True
    act: str = "silu"
    p: float = 0.1
    bias: bool = True
    pool: bool = False
    split: int = 1  # d_ff splits of the fused passes (> 1: the PARTIAL path)

    def __str__(self):
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return "-".join(f"{k}={v}" for k, v in d.items() if v != getattr(Case, k)) or "default"


def make_args(c: Case, dtype, device="cpu", seed=None, trainable=None, **needs):
    """(forward args, a function from forward outputs to backward args), fresh random inputs."""
    seed = int(torch.randint(0, 2**31, (1,))) if seed is None else seed
    inp, g = ffn_inputs(c.T, c.d, c.d_ff, c.r, c.E, dtype=dtype, gated_mlp=c.gated_mlp, moe_gate=c.moe_gate,
                        bias=c.bias, seed=seed, device=device)
    inp = {k: v.detach() if v is not None else None for k, v in inp.items()}
    tt = token_tasks("single" if c.routing == "single_grouped" else c.routing, c.T, c.E, g)
    ro = build_routing(tt, c.E, c.T, device=device)
    if c.routing == "single_grouped":
        ro.single_task, ro.offsets_cpu = SINGLE_MIXED, None
    pool = None
    if c.pool:
        B = 1 if c.T % 2 else 2
        pool = torch.rand(B, c.T // B, generator=g, dtype=torch.float64)
        pool = (pool / pool.sum(1, keepdim=True)).to(torch.float64 if dtype == torch.float64 else torch.float32)
    fa = FfnFwdArgs(**{n: inp.get(n) for n in FfnFwdArgs.__dataclass_fields__ if n in inp or n.startswith("gate_proj")},
                    token_task=ro.token_task, sorted_idx=ro.sorted_idx, expert_offsets=ro.expert_offsets,
                    offsets_cpu=ro.offsets_cpu, single_task=ro.single_task, pool=pool, activation=c.act, scale=1.7,
                    dropout_p=c.p, seed=torch.tensor(int(torch.randint(0, 2**31, (1,), generator=g))))
    gy = torch.randn(c.T, c.d, generator=g, dtype=torch.float64)
    ghp = torch.randn(pool.shape[0], c.d_ff, generator=g, dtype=torch.float64) if c.pool else None
    gzp = torch.randn(pool.shape[0], c.r, generator=g, dtype=torch.float64) if c.pool else None

    def bwd(a: FfnFwdArgs, out, wdt) -> FfnBwdArgs:
        acc = torch.float64 if wdt == torch.float64 else torch.float32
        return FfnBwdArgs(**a.__dict__, grad_y=gy.to(wdt), grad_h_pool=ghp.to(acc) if c.pool else None,
                          grad_z_pool=gzp.to(acc) if c.pool else None, **dict(zip(FFN_SAVED, out[1:8])),
                          expert_trainable=trainable, **needs)

    return fa, bwd


def to64(a: FfnFwdArgs) -> FfnFwdArgs:
    return dataclasses.replace(a, **{k: v.double() for k, v in a.__dict__.items()
                                     if isinstance(v, torch.Tensor) and v.is_floating_point()})


def run(backend, fa, bwd, dtype):
    out = (reference_ffn_forward if backend == "reference" else backend.ffn_forward)(fa)
    grads = (reference_ffn_backward if backend == "reference" else backend.ffn_backward)(bwd(fa, out, dtype))
    return dict(zip(OUTS, out)) | dict(zip(FFN_GRAD_INPUTS, grads))


def check(got: dict, eager: dict, ref: dict, dtype, what=""):
    for k, r in ref.items():
        if r is None or r.numel() == 0:
            assert got[k] is None or got[k].numel() == 0, f"{what}{k}: expected nothing"
            continue
        assert got[k] is not None and torch.isfinite(got[k]).all(), f"{what}{k}: missing or non-finite (unwritten?)"
        if r.abs().max() == 0:
            assert got[k].abs().max() == 0, f"{what}{k}: expected zeros"
            continue
        e = rel_err(got[k].cpu(), r)
        tol = tolerance(dtype, None if eager is None else eager[k], r)
        assert e <= tol, f"{what}{k}: relative error {e:.3g} > {tol:.3g}"


def compare(c: Case, dtype, device="cpu", **kw):
    """The 2x-eager rule on fresh inputs. In fp16/bf16 both errors are random draws (the gate
    gradient, a sum of rounded logit gradients with cancellation, has only 2 x d elements): one
    redraw when the first draw fails, so that only an error on both draws fails the test (a
    systematic one does; a measured joint tail of the two draws alone does not)."""
    for attempt in range(1 if dtype == torch.float32 else 2):
        fa, bwd = make_args(c, dtype, device, **kw)
        ref = run("reference", to64(fa), bwd, torch.float64)
        eager = run(EagerBackend(), fa, bwd, dtype)
        b = TritonBackend()
        b.ffn_split = c.split
        try:
            check(run(b, fa, bwd, dtype), eager, ref, dtype)
            return b
        except AssertionError:
            if attempt == 1 or dtype == torch.float32:
                raise


SLOW = pytest.mark.slow
F32, F16 = torch.float32, torch.float16
# (case, dtypes in the default run); every case runs in both dtypes with `-m ""`. The default run
# covers each routing mode, the activations, gate on/off, plain and gated MLPs, dropout, r = 1,
# T = 1, the d_ff split (PARTIAL) and the pooled outputs at ~1 min of interpreter time.
MATRIX = [
    (Case(), (F32, F16)),
    (Case(routing="single_grouped", act="gelu"), (F32, F16)),
    (Case(routing="none", act="relu"), (F32, F16)),
    (Case(r=1, split=3), (F32, F16)),
    (Case(T=1, routing="single", split=2), (F32, F16)),
    (Case(routing="mixed", gated_mlp=False, moe_gate=False, p=0.0, bias=False), (F32, F16)),
    (Case(routing="mixed", E=4, moe_gate=False), (F32,)),
    (Case(pool=True, T=24, routing="mixed", split=2, act="gelu_tanh"), (F32,)),
    (Case(routing="single"), ()),
    (Case(routing="skewed", T=40, E=5, act="gelu_tanh"), ()),
    (Case(routing="partial", T=20, E=8, gated_mlp=False, act="gelu"), ()),  # experts without tokens, a plain MLP
    (Case(T=2, routing="none", moe_gate=False, split=4), ()),
    (Case(pool=True, T=24), ()),
    (Case(T=32, d=32, d_ff=48, r=16, E=4, routing="mixed"), ()),  # multiples of the tiles, r = R_PAD
]
PARAMS = [pytest.param(c, dt, id=f"{c}-{dt}".replace("torch.", ""), marks=() if dt in fast else SLOW)
          for c, fast in MATRIX for dt in (F32, F16)]


@needs_interpreter
@pytest.mark.parametrize("case,dtype", PARAMS)
def test_matrix(case, dtype):
    compare(case, dtype)


@needs_interpreter
@pytest.mark.parametrize("needs", [dict(needs_dx=False), dict(needs_shared=False, needs_gate=False),
                                   dict(needs_task=False), dict(needs_dx=False, needs_shared=False, needs_gate=False)],
                         ids=lambda d: ",".join(d))
def test_needs_flags_and_frozen_experts(needs):
    """Only what is asked is computed; frozen experts get zeros (their blocks written by the kernels)."""
    c = Case(routing="mixed", E=4)
    fa, bwd = make_args(c, torch.float32, trainable=[True, False, True, False], **needs)
    ref = run("reference", to64(fa), bwd, torch.float64)
    got = run(TritonBackend(), fa, bwd, torch.float32)
    check(got, None, ref, torch.float32)
    for n in FFN_GRAD_INPUTS:
        if "_task_" in n and got[n] is not None:
            assert got[n][[1, 3]].abs().max() == 0, n


@needs_interpreter
def test_same_dropout_masks_as_eager_and_seed_on_device():
    """The kernels read the seed tensor and regenerate x's and h's masks exactly as eager does:
    with p = 0.5 a different mask would move the result far beyond the tolerance."""
    c = Case(p=0.5, routing="mixed")
    fa, bwd = make_args(c, torch.float32)
    eager = run(EagerBackend(), fa, bwd, torch.float32)
    got = run(TritonBackend(), fa, bwd, torch.float32)
    for k in ("y", "z_s", "z_t", "x", "down_proj_shared_A", "up_proj_task_A"):
        assert rel_err(got[k], eager[k]) < 1e-5, k
    fa2 = dataclasses.replace(fa, seed=fa.seed + 1)
    assert rel_err(TritonBackend().ffn_forward(fa2)[0], got["y"]) > 1e-3


@needs_interpreter
def test_corrupt_routing_stays_in_bounds():
    """sorted_idx entries outside [0, T) and offsets beyond T are skipped or clamped, never
    followed (an out-of-bounds access crashes the interpreter), in the FFN kernels and in the
    linear stages the op reuses (issue 15's bounds)."""
    c = Case(routing="mixed", T=29, E=4)
    fa, bwd = make_args(c, torch.float32)
    bad = fa.sorted_idx.clone()
    bad[::3] = 10**6
    bad[1::5] = -7
    for offsets in (fa.expert_offsets * 3, fa.expert_offsets.flip(0), fa.expert_offsets - 40):
        fa = dataclasses.replace(fa, sorted_idx=bad, expert_offsets=offsets.contiguous(), offsets_cpu=None,
                                 single_task=SINGLE_MIXED)
        out = run(TritonBackend(), fa, bwd, torch.float32)
        assert out["y"].shape == (c.T, c.d)


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs CUDA (compiled Triton kernels)")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("case", [Case(T=300, d=256, d_ff=688, r=8, E=4, routing="mixed"),
                                  Case(T=7, d=256, d_ff=688, r=8, E=4, routing="mixed", pool=False),
                                  Case(T=256, d=128, d_ff=352, r=16, E=2, routing="partial", pool=True)], ids=str)
def test_gpu(case, dtype):
    compare(case, dtype, device="cuda")

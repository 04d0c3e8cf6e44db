"""Tests of the triton backend's ``gemm`` variants (``variants.py``) against the float64 reference.

CPU: the kernels run under the Triton interpreter (tests/conftest.py); the harness -- cases, fresh inputs, the reference, the accuracy
contract (a result in dtype dt at most 2x as far from the float64 reference as the eager
backend's in dt; fp32: 1e-5) -- is ``backend_harness``'s. Outputs are poisoned (every
``torch.empty`` NaN) before the kernels write them.

Both forward paths of ``gemm`` -- the GEMM path (``decode_t=0`` forces it on small inputs) and
the decode path (T <= 64) -- run the whole case matrix in tests/test_conformance.py. ``gemm-tma`` runs the TMA kernel where the operands
are 16-byte aligned (d % 8 == 0 here) and the pointer GEMM otherwise; the interpreter emulates
the TMA descriptors (zero fill, clipped stores). Big shapes (r = 128, E = 64) are ``slow``.
"""

from __future__ import annotations

import warnings

import torch

import dataclasses  # noqa: E402

import pytest  # noqa: E402

pytest.importorskip("triton")
from backend_harness import GRADS, Case, bwd_args, check, fwd_args, make_inputs, reference, run  # noqa: E402
from test_triton_backend import GPU_MATRIX, gpu, needs_gpu, needs_interpreter  # noqa: E402

from moecl_kernels import backends as bk  # noqa: E402
from moecl_kernels.backends.eager import EagerBackend  # noqa: E402
from moecl_kernels.backends.triton import Tile, TritonBackend  # noqa: E402
from moecl_kernels.backends.triton import backend as tb  # noqa: E402
from moecl_kernels.backends.triton import decode as D  # noqa: E402
from moecl_kernels.backends.triton import fused_gemm as G  # noqa: E402
from moecl_kernels.backends.triton import lora_passes as L  # noqa: E402
from moecl_kernels.backends.triton import variants as V  # noqa: E402
from moecl_kernels.ops.linear import moe_lora_linear  # noqa: E402

pytestmark = pytest.mark.usefixtures("poison_uninitialized_memory")  # tests/conftest.py
DTYPES = [torch.float32, torch.float16]


def variant(name: str, decode_t: int = 0, **tiles) -> TritonBackend:
    b = TritonBackend(variant=name, tiles=tiles or None)
    b._gemm.decode_t = decode_t
    return b


def assert_matches(b: TritonBackend, case: Case, dtype, deterministic: bool = False):
    inp = make_inputs(case, dtype)
    ref, eager = reference(inp), run(EagerBackend(), inp)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # gemm-tma on unaligned operands says it falls back
        got = run(b, inp, deterministic=deterministic)
    check(got, eager, ref, dtype, what=f"{b.variant} {case} det={deterministic}: ")


# the gemm and decode paths over the whole case matrix: tests/test_conformance.py (triton-gemm,
# triton-gemm-path); here the TMA kernel on aligned rows
ALIGNED = [  # rows 16-byte aligned: gemm-tma runs the TMA kernel (on unaligned ones it is gemm-ptr)
    Case(T=48, d_in=32, d_out=48, r=8, E=4, routing="mixed"),
    Case(T=33, d_in=24, d_out=40, r=16, E=2, routing="single", p=0.0),
]


@needs_interpreter
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", ALIGNED, ids=str)
def test_tma_path(case, dtype):
    """Forward (shrink + fused GEMM) and backward (gy shrink with dB, dgrad GEMM, x wgrad, finalize)."""
    assert_matches(variant("gemm-tma"), case, dtype)


@needs_interpreter
@pytest.mark.parametrize("case", [Case(), Case(routing="single", T=40)], ids=str)
def test_deterministic(case):
    """deterministic=True: per-block slots summed in a fixed order, no atomics -- and bit-identical reruns."""
    b = variant("gemm")
    assert_matches(b, case, torch.float32, deterministic=True)
    inp = make_inputs(case, torch.float32)
    one, two = run(b, inp, deterministic=True), run(b, inp, deterministic=True)
    for k in GRADS:
        assert torch.equal(one[k], two[k]), k


@needs_interpreter
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", [Case(T=70, d_in=32, d_out=40, r=3, E=64, routing="mixed"),
                                  Case(T=20, d_in=40, d_out=24, r=128, E=2),
                                  Case(T=9, d_in=40, d_out=24, r=1, E=64, routing="mixed")], ids=str)
@pytest.mark.parametrize("decode_t", [0, 64])
@pytest.mark.slow
def test_big_rank_and_many_experts(case, dtype, decode_t):
    assert_matches(variant("gemm-tma", decode_t=decode_t), case, dtype)


@needs_interpreter
def test_small_tiles_many_programs():
    """Several row tiles, column tiles, K steps, wgrad chunks and decode splits."""
    tiles = dict(g_shrink=Tile(block_t=16, block_k=16), g_gemm=Tile(block_t=16, block_n=16, block_k=16, group=3),
                 g_wgrad=Tile(chunk=16, block_t=16, block_n=16), g_decode=Tile(block_n=16, block_k=16, split_k=3))
    case = Case(T=70, d_in=45, routing="skewed", E=4)
    assert_matches(variant("gemm", **tiles), case, torch.float32)
    assert_matches(variant("gemm", decode_t=70, **tiles), case, torch.float32, deterministic=True)


@needs_interpreter
def test_frozen_experts_and_needs():
    """Frozen experts get zero dA/dB (written by the finalize kernel); unneeded gradients are None."""
    case = Case(E=4, T=40, routing="mixed")
    inp = make_inputs(case, torch.float32)
    ref, eager = reference(inp), run(EagerBackend(), inp)
    b = variant("gemm")
    trainable = [True, False, False, True]
    got = run(b, inp, expert_trainable=trainable)
    check(got, eager, ref, torch.float32, names=("dx", "dA_s", "dB_s", "dgate"))
    for e, on in enumerate(trainable):
        if on:
            for k in ("dA", "dB"):
                check({k: got[k][e]}, {k: eager[k][e]}, {k: ref[k][e]}, torch.float32, what=f"expert {e} ")
        else:
            assert (got["dA"][e] == 0).all() and (got["dB"][e] == 0).all()
    got = run(b, inp, needs_dx=False, needs_shared=False, needs_gate=False)
    assert got["dx"] is None and got["dA_s"] is None and got["dB_s"] is None and got["dgate"] is None
    check(got, eager, ref, torch.float32, names=("dA", "dB"))


class _Count:
    """Counts launches of the module's kernels (and still runs them)."""

    def __init__(self, monkeypatch, *modules):
        self.n = {}
        for m in modules:
            for name in [n for n in dir(m) if n.endswith("_kernel")]:
                monkeypatch.setattr(m, name, self._spy(name, getattr(m, name)))

    def _spy(self, name, real):
        outer = self

        class Spy:
            def __getitem__(self, grid):
                def launch(*args, **kw):
                    outer.n[name] = outer.n.get(name, 0) + 1
                    return real[grid](*args, **kw)

                return launch

        return Spy()


@needs_interpreter
def test_launch_counts(monkeypatch):
    """Forward: 2 kernels (shrink + GEMM, or the 2 decode kernels); backward: 4 kernels."""
    count = _Count(monkeypatch, L, G, D)
    inp = make_inputs(Case(T=40, d_in=32, d_out=48, routing="mixed"), torch.float16)
    for decode_t, fwd in ((0, {"_lora_shrink_kernel", "_gemm_tma_kernel"}),
                          (64, {"_decode_gemv_kernel", "_decode_finalize_kernel"})):
        b = variant("gemm-tma", decode_t=decode_t)
        count.n.clear()
        saved = b.forward(fwd_args(inp))
        assert count.n == {k: 1 for k in fwd}
        count.n.clear()
        b.backward(bwd_args(inp, saved))
        assert count.n == {"_lora_shrink_kernel": 1, "_gemm_tma_kernel": 1, "_lora_wgrad_x_kernel": 1,
                           "_grad_finalize_kernel": 1}


@needs_interpreter
def test_seed_is_read_on_the_device():
    """The kernels read the seed tensor when they run: a new value written into the same tensor
    (what a CUDA-graph replay sees) gives the new mask, with the same launch arguments."""
    case = Case(T=40, routing="mixed", E=4)
    inp = make_inputs(case, torch.float32)
    seed = torch.tensor(inp.seed, dtype=torch.int64)
    for decode_t in (0, 64):
        b = variant("gemm", decode_t=decode_t)
        args = dataclasses.replace(fwd_args(inp), seed=seed)
        first = b.forward(args)[0].clone()
        seed.fill_(inp.seed + 1)
        second = b.forward(args)[0]
        seed.fill_(inp.seed)
        want = reference(dataclasses.replace(inp, seed=inp.seed + 1))["y"]
        assert not torch.equal(first, second)
        check({"y": second}, None, {"y": want}, torch.float32)


@needs_interpreter
def test_corrupt_routing_stays_in_bounds():
    """Task ids outside [-1, E) in the token map are treated as 'no task' by the GEMM (never used
    as an address); sorted indices outside [0, T) are skipped by the rank-r passes."""
    case = Case(T=40, routing="mixed", E=4, p=0.0)
    inp = make_inputs(case, torch.float32)
    ro = inp.ro
    bad = ro.token_task.clone()
    bad[[3, 17]] = torch.tensor([99, -7], dtype=bad.dtype)
    corrupt = dataclasses.replace(fwd_args(inp), token_task=bad)
    y = variant("gemm").forward(corrupt)[0]
    assert torch.isfinite(y).all()
    ref = reference(inp)["y"]
    ok = torch.ones(case.T, dtype=torch.bool)
    ok[[3, 17]] = False
    check({"y": y[ok]}, None, {"y": ref[ok]}, torch.float32)
    idx = ro.sorted_idx.clone()
    lost = idx[[0, 5]].long()  # these tokens' rank-r rows are never computed (NaN-poisoned)
    idx[[0, 5]] = torch.tensor([case.T + 1000, -3], dtype=idx.dtype)
    y = variant("gemm").forward(dataclasses.replace(fwd_args(inp), sorted_idx=idx))[0]
    ok = torch.ones(case.T, dtype=torch.bool)
    ok[lost] = False
    check({"y": y[ok]}, None, {"y": ref[ok]}, torch.float32)


def test_variant_selection(monkeypatch):
    monkeypatch.setenv(tb.VARIANT_ENV, "gemm-ptr")
    assert TritonBackend().variant == "gemm-ptr"
    assert TritonBackend(expand="fused").variant == "fused"  # an explicit expand mode wins over the env
    assert TritonBackend(variant="addmm").variant == "addmm"
    monkeypatch.setenv(tb.VARIANT_ENV, "nope")
    with pytest.raises(ValueError, match="MOECL_TRITON_VARIANT"):
        TritonBackend()
    monkeypatch.delenv(tb.VARIANT_ENV)
    assert TritonBackend().variant == "addmm"  # the default until a GPU run shows a variant ahead
    with pytest.raises(ValueError, match="unknown kernel"):
        TritonBackend(variant="gemm", tiles={"g_nope": Tile()})


def test_single_task_hint_is_checked():
    inp = make_inputs(Case(T=4, routing="single", E=2), torch.float32)
    with pytest.raises(ValueError, match="single_task=5"):
        variant("gemm").forward(dataclasses.replace(fwd_args(inp), single_task=5))


def test_tile_fit():
    """Table tiles narrow where they would spill (fp32, unaligned rows, the dgrad's dropout mask)."""
    t = V.tile_for("g_tma", "sm_90", 16)
    assert V._fit("g_tma", t, ieee=False, aligned=True, dropout=True).block_n == 128
    assert V._fit("g_gemm", t, ieee=True, aligned=True).block_n == 64
    assert V.tile_for("g_tma", "sm_90", 128).block_n == 128
    assert V.tile_for("g_decode", "sm_120", 16).num_stages == 2


@needs_interpreter
def test_op_autograd_with_a_variant(monkeypatch):
    """Through the public op and autograd, the variant registered as a backend name."""
    b = variant("gemm")
    monkeypatch.setitem(bk._factories, "triton-gemm-test", lambda: b)
    monkeypatch.setitem(bk._instances, "triton-gemm-test", b)
    case = Case(T=70, routing="skewed")
    inp = make_inputs(case, torch.float32)
    ref = reference(inp)
    leaf = {k: (v.clone().requires_grad_(k not in ("weight", "bias")) if v is not None else None)
            for k, v in inp.x.items()}
    y = moe_lora_linear(**leaf, routing=inp.ro, scale=case.scale, dropout_p=case.p, seed=torch.tensor(inp.seed),
                        backend="triton-gemm-test")
    y.backward(inp.gy)
    got = dict(y=y, dx=leaf["x"].grad, dA_s=leaf["shared_A"].grad, dB_s=leaf["shared_B"].grad,
               dA=leaf["task_A"].grad, dB=leaf["task_B"].grad, dgate=leaf["gate_weight"].grad)
    check(got, None, ref, torch.float32, names=list(got))


# ---------------------------------------------------------------------------------------------
# the static report's arithmetic and checks (its compile runs in CI: python -m ...compile_check)


def test_compile_report_occupancy_and_checks():
    from moecl_kernels.backends.triton import compile_check as cc

    assert cc.resident_ctas(90, 255, 0, 8) == (1, "regs")  # 255 -> 256 regs x 256 threads = the register file
    assert cc.resident_ctas(90, 64, 100 * 1024, 4) == (2, "smem")  # (100 + 1) KiB of 228 KiB
    assert cc.resident_ctas(80, 32, 0, 4) == (16, "threads")
    spec = cc.Case("spec", "gemm-tma")
    good = {"smem": 200_000, "wgmma": 6, "mma.sync": 0, "cp.async": 0, "TMA": 7, "STACK": 0, "LOCAL": 0}
    assert cc.checks(90, "_gemm_tma_kernel", {"PREC": "tf32"}, spec, good) == []
    assert cc.checks(90, "_gemm_tma_kernel", {"PREC": "tf32"}, spec, good | {"wgmma": 0, "mma.sync": 4}) == [
        "sm_90 GEMM without wgmma (mma.sync fallback)"]
    assert "TMA GEMM without cp.async.bulk.tensor" in cc.checks(90, "_gemm_tma_kernel", {}, spec, good | {"TMA": 0})
    assert cc.checks(90, "_gemm_ptr_kernel", {"PREC": "ieee"}, spec, good | {"wgmma": 0, "TMA": 0, "cp.async": 3}) == []
    assert cc.checks(80, "_gemm_ptr_kernel", {"PREC": "tf32"}, spec, good | {"wgmma": 0, "TMA": 0, "smem": 0}) == [
        "no mma.sync", "loads not pipelined (no cp.async / TMA)"]
    assert cc.checks(90, "_lora_shrink_kernel", {}, spec, good | {"STACK": 8})[0].startswith("spills")
    assert cc.checks(80, "_lora_shrink_kernel", {}, spec, good | {"smem": 200_000}) == [
        "shared memory 200000 B > 166912 B"]


# ---------------------------------------------------------------------------------------------
# GPU: compiled kernels, bf16, CUDA graphs (run with -m gpu on a GPU machine)


GPU_CASES = GPU_MATRIX + [Case(T=1024, d_in=512, d_out=384, r=16, E=8, routing="mixed")]
GPU_RUNS = ([(c, torch.bfloat16, n) for c in GPU_CASES for n in ("gemm", "gemm-tma")]
            + [(c, dt, n) for c in GPU_CASES[:4:3] + GPU_CASES[-1:] for dt, n in ((torch.float16, "gemm-ptr"),
                                                                              (torch.float32, "gemm"))])


@gpu
@needs_gpu
@pytest.mark.parametrize("case,dtype,name", GPU_RUNS, ids=str)
def test_gpu_variants(case, dtype, name):
    b = TritonBackend(variant=name)
    assert_matches(b, case, dtype)
    inp = make_inputs(case, dtype, device="cuda")
    first, second = run(b, inp, deterministic=True), run(b, inp, deterministic=True)
    for k in GRADS:
        if first[k] is not None:
            assert torch.equal(first[k], second[k]), f"{k} not bitwise reproducible with deterministic=True"


def _gpu_step(T: int):
    """bf16 inputs on the GPU, the ``gemm`` variant, fwd args with the seed as a device tensor,
    and ``step(deterministic)``: forward + backward, everything compiled by a first call."""
    inp = make_inputs(Case(T=T, d_in=256, d_out=128, r=16, E=4, routing="mixed"), torch.bfloat16, device="cuda")
    b = TritonBackend(variant="gemm")
    a = dataclasses.replace(fwd_args(inp), seed=torch.tensor(inp.seed, dtype=torch.int64, device="cuda"))

    def step(det: bool = False):
        saved = b.forward(a)
        return saved, b.backward(dataclasses.replace(bwd_args(inp, saved), seed=a.seed, deterministic=det))

    step(False), step(True)
    torch.cuda.synchronize()
    return inp, a.seed, step


@gpu
@needs_gpu
@pytest.mark.parametrize("T", [16, 256])
def test_gpu_graph_replay_reads_the_new_seed(T):
    """Captured once, replayed after the layer writes a new seed: the replay uses the new mask."""
    inp, seed, step = _gpu_step(T)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        saved, grads = step()
    seed.fill_(inp.seed + 1)
    g.replay()
    torch.cuda.synchronize()
    want = reference(dataclasses.replace(inp, seed=inp.seed + 1))
    eager = run(EagerBackend(), dataclasses.replace(inp, seed=inp.seed + 1))
    check(dict(zip(("y", "h_s", "h_t", "coef"), saved)) | dict(zip(GRADS, grads)), eager, want, torch.bfloat16)


@gpu
@needs_gpu
@pytest.mark.parametrize("T", [16, 300])
def test_gpu_variant_no_host_sync(T):
    _, _, step = _gpu_step(T)
    torch.cuda.set_sync_debug_mode("error")
    try:
        step(False), step(True)
    finally:
        torch.cuda.set_sync_debug_mode(0)

"""Tests of the ``triton`` backend against the float64 reference.

CPU: every kernel runs under the Triton interpreter; tests/conftest.py sets
``TRITON_INTERPRET=1`` (machines without CUDA only) before any module imports triton, which
decides when a kernel is defined whether it is interpreted. The matrix of every case against
the reference is tests/test_conformance.py; this file holds the Triton-specific paths.

Standards (docs/spec.md + team rules): fresh random inputs per test, outputs poisoned (every
``torch.empty`` NaN-filled) before kernels write them, odd sizes, r = 1, T = 1, single /
mixed / skewed / no-task routing, dropout, gate on and off. A result in dtype ``dt`` may
be at most 2x as far from the float64 reference as the eager backend's result in ``dt``
(fp32: at most 1e-5 relative). Markers: ``gpu`` (needs CUDA), ``slow`` (> 20 s).
"""

from __future__ import annotations

import os

import torch

import contextlib  # noqa: E402
import dataclasses  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")

from backend_harness import GRADS, Case, bwd_args, check, fwd_args, make_inputs, reference, run  # noqa: E402

from moecl_kernels import backends as bk  # noqa: E402
from moecl_kernels.contract import SINGLE_MIXED, BwdArgs  # noqa: E402
from moecl_kernels.backends.eager import EagerBackend  # noqa: E402
from moecl_kernels.contract import dropout as D  # noqa: E402
from moecl_kernels.ops.custom_ops import FWD_SCHEMA_ARGS, call_args, moe_lora_fwd  # noqa: E402
from moecl_kernels.ops.linear import moe_lora_linear  # noqa: E402
from moecl_kernels.routing import Routing  # noqa: E402

tb = pytest.importorskip("moecl_kernels.backends.triton.backend")
from moecl_kernels.backends.triton import Tile, TileTable, TritonBackend, configs, kernels  # noqa: E402

ON_GPU = torch.cuda.is_available() and not tb.INTERPRETED
needs_interpreter = pytest.mark.skipif(
    torch.cuda.is_available() or not tb.INTERPRETED,
    reason="CPU tests need the Triton interpreter: TRITON_INTERPRET=1 before triton is imported "
    "(run this module in its own process)",
)
gpu = pytest.mark.gpu
needs_gpu = pytest.mark.skipif(not ON_GPU, reason="needs CUDA (compiled Triton kernels)")

pytestmark = pytest.mark.usefixtures("poison_uninitialized_memory")  # tests/conftest.py
DTYPES_CPU = [torch.float32, torch.float16]  # (the matrix over every case is tests/test_conformance.py)


@needs_interpreter
def test_gate_gradient_larger_than_the_rank_rows():
    """r = 1 and 2 * d_in above one reduce block: the one reduce launch must cover the gate's 2 rows."""
    inp = make_inputs(Case(T=5, d_in=600, d_out=20, r=1, E=2), torch.float32)
    check(run(TritonBackend(), inp), run(EagerBackend(), inp), reference(inp), torch.float32)


SPLIT_TILES = dict(
    shrink=Tile(block_t=16, block_k=16, split_k=3),
    wgrad=Tile(chunk=16, block_t=16, block_n=16),
    expand=Tile(block_t=16, block_n=16, group=1),
    fused=Tile(block_t=16, block_n=32, block_k=16, group=3),
)


@needs_interpreter
@pytest.mark.parametrize("expand", ["addmm", "fused"])
@pytest.mark.parametrize("case", [Case(T=70, d_in=45), Case(routing="single", d_in=45, p=0.0),
                                  Case(routing="none")], ids=str)
def test_split_k_and_small_chunks(case, expand):
    """Split-K shrink (the decode path: fp32 partials + finalize), many wgrad slots per expert."""
    inp = make_inputs(case, torch.float32)
    b = TritonBackend(expand=expand, tiles=SPLIT_TILES)
    ref, eager = reference(inp), run(EagerBackend(), inp)
    check(run(b, inp), eager, ref, torch.float32)
    check(run(b, inp, deterministic=True), eager, ref, torch.float32, names=GRADS)


@needs_interpreter
@pytest.mark.parametrize("dtype", DTYPES_CPU, ids=str)
@pytest.mark.parametrize("deterministic", [False, True])
def test_frozen_experts_cost_nothing_and_get_zeros(dtype, deterministic):
    case = Case(E=4, T=40)
    inp = make_inputs(case, dtype)
    ref, eager = reference(inp), run(EagerBackend(), inp)
    trainable = [True, False, False, True]
    got = run(TritonBackend(), inp, expert_trainable=trainable, deterministic=deterministic)
    check(got, eager, ref, dtype, names=("dx", "dA_s", "dB_s", "dgate"))
    for e, on in enumerate(trainable):
        if on:
            for k in ("dA", "dB"):
                check({k: got[k][e]}, {k: eager[k][e]}, {k: ref[k][e]}, dtype, what=f"expert {e} ")
        else:
            assert (got["dA"][e] == 0).all() and (got["dB"][e] == 0).all()

    # no trainable expert: no task-expert work at all (the kernels are told DO_TASK=False)
    launched = []
    real = kernels._wgrad_kernel

    class Spy:
        def __getitem__(self, grid):
            def launch(*args, **meta):
                launched.append(meta["DO_TASK"])
                return real[grid](*args, **meta)
            return launch

    kernels._wgrad_kernel = Spy()
    try:
        got = run(TritonBackend(), inp, expert_trainable=[False] * 4, deterministic=deterministic)
    finally:
        kernels._wgrad_kernel = real
    assert launched and not any(launched)
    assert (got["dA"] == 0).all() and (got["dB"] == 0).all()


NEEDS = [
    dict(needs_dx=True, needs_shared=False, needs_task=False, needs_gate=False),
    dict(needs_dx=False, needs_shared=True, needs_task=False, needs_gate=False),
    dict(needs_dx=False, needs_shared=False, needs_task=True, needs_gate=False),
    dict(needs_dx=False, needs_shared=False, needs_task=False, needs_gate=True),
]


@needs_interpreter
@pytest.mark.parametrize("needs", NEEDS, ids=lambda n: "+".join(k[6:] for k, v in n.items() if v))
def test_needs_flags(needs):
    """Unneeded gradients are None; needed ones are right -- dx includes the gate path even
    when the gate weight itself is frozen (the gate sees x)."""
    inp = make_inputs(Case(), torch.float32)
    ref, eager = reference(inp), run(EagerBackend(), inp)
    got = run(TritonBackend(), inp, **needs)
    wanted = dict(dx=needs["needs_dx"], dA_s=needs["needs_shared"], dB_s=needs["needs_shared"],
                  dA=needs["needs_task"], dB=needs["needs_task"], dgate=needs["needs_gate"])
    for k, on in wanted.items():
        if not on:
            assert got[k] is None, k
    check(got, eager, ref, torch.float32, names=[k for k, on in wanted.items() if on])


@needs_interpreter
@pytest.mark.parametrize("dtype", DTYPES_CPU, ids=str)
@pytest.mark.parametrize("case", [Case(), Case(routing="single", gate=False)], ids=str)
def test_cross_backend_saved_tensors(case, dtype):
    """Any backend's backward consumes any backend's forward outputs."""
    inp = make_inputs(case, dtype)
    ref, eager_b, triton_b = reference(inp), EagerBackend(), TritonBackend()
    eager = run(eager_b, inp)
    t_saved, e_saved = triton_b.forward(fwd_args(inp)), eager_b.forward(fwd_args(inp))
    for saved, bwd, what in ((t_saved, eager_b, "triton fwd + eager bwd: "),
                             (e_saved, triton_b, "eager fwd + triton bwd: ")):
        got = dict(zip(GRADS, bwd.backward(bwd_args(inp, saved))))
        check(got, eager, ref, dtype, names=GRADS, what=what)


def _check_strided(case: Case, dtype, device: str, expand: str):
    """Non-contiguous activations and weights are read through their strides (no copy)."""
    inp = make_inputs(case, dtype, device=device)
    ref, eager = reference(inp), run(EagerBackend(), inp)

    def column_major(t):
        return t.t().contiguous().t() if t is not None and t.dim() == 2 else t

    inp.x = {k: column_major(v) for k, v in inp.x.items()}
    inp.x["task_A"] = inp.x["task_A"].transpose(1, 2).contiguous().transpose(1, 2)
    inp.gy = column_major(inp.gy)
    assert not inp.x["x"].is_contiguous() and not inp.x["task_A"].is_contiguous()
    check(run(TritonBackend(expand=expand), inp), eager, ref, dtype)


@needs_interpreter
@pytest.mark.parametrize("expand", ["addmm", "fused"])
def test_strided_inputs(expand):
    _check_strided(Case(T=21 if expand == "addmm" else 70, routing="skewed"), torch.float32, "cpu", expand)


@needs_interpreter
@pytest.mark.parametrize("deterministic", [False, True])
def test_op_autograd(deterministic):
    """Through the public op: moe_lora_linear(..., backend="triton") + autograd."""
    c = Case(T=23, routing="skewed")
    inp = make_inputs(c, torch.float32)
    ref = reference(inp)
    leaf = {k: (v.clone().requires_grad_(k not in ("weight", "bias")) if v is not None else None)
            for k, v in inp.x.items()}
    y = moe_lora_linear(**leaf, routing=inp.ro, scale=c.scale, dropout_p=c.p, seed=torch.tensor(inp.seed),
                        deterministic=deterministic, backend="triton")
    y.backward(inp.gy)
    got = dict(y=y, dx=leaf["x"].grad, dA_s=leaf["shared_A"].grad, dB_s=leaf["shared_B"].grad,
               dA=leaf["task_A"].grad, dB=leaf["task_B"].grad, dgate=leaf["gate_weight"].grad)
    check(got, None, ref, torch.float32, names=list(got))


@needs_interpreter
def test_opcheck():
    c = Case(T=9, d_in=17, d_out=11, r=3, E=2)
    inp = make_inputs(c, torch.float32)
    x = {k: (v.requires_grad_(k not in ("weight", "bias")) if v is not None else None) for k, v in inp.x.items()}
    ro = inp.ro
    args = call_args(FWD_SCHEMA_ARGS, **x, token_task=ro.token_task, sorted_idx=ro.sorted_idx,
                     expert_offsets=ro.expert_offsets, offsets_cpu=ro.offsets_cpu, single_task=ro.single_task,
                     scale=c.scale, dropout_p=c.p, seed=torch.tensor(inp.seed), expert_trainable=[],
                     deterministic=False, backend="triton")
    torch.library.opcheck(moe_lora_fwd, args)


# ---------------------------------------------------------------------------------------------
# pieces


@triton.jit
def _keep_probe(out_ptr, rows_ptr, n_rows, n_cols, SEED, thr, BR: tl.constexpr, BC: tl.constexpr):
    r = tl.program_id(0) * BR + tl.arange(0, BR)
    c = tl.program_id(1) * BC + tl.arange(0, BC)
    rows = tl.load(rows_ptr + r, mask=r < n_rows, other=0)
    keep = kernels._keep(kernels._row_keys(rows, kernels._seed_key(SEED)), c, thr)
    tl.store(out_ptr + r[:, None] * n_cols + c[None, :], keep.to(tl.int8),
             mask=(r < n_rows)[:, None] & (c < n_cols)[None, :])


@needs_interpreter
@pytest.mark.parametrize("seed", [0, 1234, 2**31 + 7, 2**32 - 1, 2**40 + 5, -3])
@pytest.mark.parametrize("p", [0.05, 0.5, 0.999])
def test_dropout_hash_is_bit_exact(seed, p):
    """The in-kernel hash, seeded from device memory (int64, used mod 2**32), reproduces
    contract.dropout for large row/col indices, seeds >= 2**31, above 2**32 and negative."""
    rows = torch.tensor([0, 1, 2, 77, 65535, 65536, 2**20 + 3, 2**31 - 1], dtype=torch.int32)
    n_cols = 300
    seed_t = torch.tensor(seed, dtype=torch.int64)
    drop = tb._Dropout.of(dataclasses.replace(fwd_args(make_inputs(Case(T=2), torch.float32)), seed=seed_t,
                                              dropout_p=p))
    assert drop.seed.data_ptr() == seed_t.data_ptr()  # the kernels read the caller's tensor: no copy
    out = torch.empty(len(rows), n_cols, dtype=torch.int8)
    _keep_probe[(1, triton.cdiv(n_cols, 64))](out, rows, len(rows), n_cols, drop.seed, drop.thr, BR=8, BC=64)
    want = D.keep_mask_reference(seed, rows.long(), torch.arange(n_cols), p)
    assert torch.equal(out.bool(), want)
    assert torch.equal(D.keep_mask(seed_t, rows.long(), torch.arange(n_cols), p), want)  # tensor seed, no .item()


def test_unavailable_reason(monkeypatch):
    b = TritonBackend()
    x = torch.zeros(2, 3)
    assert b.unavailable_reason(x.double()) == "fp64 is not supported by the triton backend"
    assert "int" in b.unavailable_reason(x.long())
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert "TRITON_INTERPRET" in b.unavailable_reason(x)
    if tb.INTERPRETED:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        assert b.unavailable_reason(x) is None
        assert "bf16" in b.unavailable_reason(x.bfloat16())
        assert bk.resolve_backend("triton", x) == "triton"
        assert bk.resolve_backend("auto", x) == "eager"  # auto never picks the interpreter
    with pytest.raises(bk.BackendUnavailableError, match="fp64"):
        bk.resolve_backend("triton", x.double())
    assert bk.get_backend("triton").priority == 20 and bk.get_backend("triton").name == "triton"
    with pytest.raises(ValueError, match="expand"):
        TritonBackend(expand="cublas")


def test_tile_tables_cover_every_bucket():
    for arch in ("sm_90", "sm_80", "sm_86", "interpreter"):
        table = configs.table_for(arch)
        for kern in configs.KERNELS:
            for T in (1, 64, 65, 1024, 1025, 65536):
                for r in (1, 32, 33, 128):
                    t = table[(kern, *configs._bucket(T, r))]
                    assert min(t.block_t, t.block_n, t.block_k) >= 16 and t.chunk % t.block_t == 0
    assert all(t.num_stages <= 2 for t in configs.table_for("sm_120").values())


def test_autotune_is_opt_in_and_cached(monkeypatch, tmp_path):
    monkeypatch.setenv(configs.CACHE_DIR_ENV, str(tmp_path))
    times = iter([3.0, 1.0, 2.0, 5.0, 4.0, 6.0, 7.0])
    benched = []

    def bench(fn):
        fn()
        return next(times)

    runs = []
    table = TileTable(bench=bench)
    dev = torch.device("cpu")
    default = table.get("shrink", dev, 100, 8)
    monkeypatch.delenv(configs.AUTOTUNE_ENV, raising=False)
    assert table.pick("shrink", dev, 100, 8, ("k",), runs.append) == default and not runs  # off by default

    monkeypatch.setattr(TileTable, "autotune_enabled", staticmethod(lambda device: True))
    best = table.pick("shrink", dev, 100, 8, ("k",), lambda t: benched.append(t))
    assert best == benched[1] != default  # the candidate that timed 1.0
    again = TileTable(bench=lambda fn: pytest.fail("re-tuned a cached key"))
    assert again.pick("shrink", dev, 100, 8, ("k",), runs.append) == best  # persisted
    assert json.loads((tmp_path / "autotune.json").read_text())


@pytest.mark.slow
def test_kernels_compile_for_sm80_and_sm90():
    """Every kernel variant the matrix launches compiles for real GPUs (no GPU needed)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-m", "moecl_kernels.backends.triton.compile_check"], env=env,
                         capture_output=True, text=True, timeout=1800)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]


# ---------------------------------------------------------------------------------------------
# GPU safety, shown on the CPU: graph-replayable seeds, the device guard, routing bounds,
# int64 addressing, launch count

KERNEL_NAMES = ("_shrink_kernel", "_shrink_finalize_kernel", "_expand_kernel", "_wgrad_kernel",
                "_wgrad_reduce_kernel")


class KernelSpy:
    """Replaces every kernel of ``kernels``: records each launch (name, grid, args, meta) and,
    unless ``stub``, runs it through ``wrap`` (default: as is)."""

    def __init__(self, monkeypatch, stub=False, wrap=None, on_launch=None):
        self.launches = []
        for name in KERNEL_NAMES:
            monkeypatch.setattr(kernels, name, self._spy(name, getattr(kernels, name), stub, wrap, on_launch))

    def _spy(self, name, real, stub, wrap, on_launch):
        spy = self

        class Spy:
            def __getitem__(self, grid):
                def launch(*args, **meta):
                    spy.launches.append((name, real, grid, args, meta))
                    if on_launch is not None:
                        on_launch(name)
                    if not stub:
                        (wrap or (lambda n, fn, g, a, m: fn[g](*a, **m)))(name, real, grid, args, meta)
                return launch

        return Spy()

    def names(self):
        return [n for n, *_ in self.launches]

    def replay(self):
        """Run every recorded launch again with the very same arguments (a CUDA graph replay)."""
        for _, real, grid, args, meta in self.launches:
            real[grid](*args, **meta)


@needs_interpreter
def test_dropout_follows_the_seed_tensor_on_replay(monkeypatch):
    """The kernels read the seed from memory: replaying the recorded launches -- same grid, same
    arguments, as a captured CUDA graph does -- after refilling the seed tensor in place gives
    the new seed's mask (forward and backward), not the captured one's."""
    c = Case(T=70, p=0.3)  # fused expand above the decode size: every stage is a Triton launch
    inp = make_inputs(c, torch.float32)
    seed = inp.seed_t
    b = TritonBackend(expand="fused")
    spy = KernelSpy(monkeypatch)
    monkeypatch.setattr(torch.Tensor, "item", lambda self: pytest.fail("a host read of a device value (.item())"))
    saved = b.forward(fwd_args(inp))
    grads = b.backward(bwd_args(inp, saved))
    first = dict(zip(("y", "h_s", "h_t", "coef"), [t.clone() for t in saved])) | {
        k: g.clone() for k, g in zip(GRADS, grads)}
    eager = run(EagerBackend(), inp)
    check(first, eager, reference(inp), torch.float32, what="capture: ")
    assert all(any(a is seed or (isinstance(a, torch.Tensor) and a.data_ptr() == seed.data_ptr()) for a in args)
               for n, _, _, args, m in spy.launches if m.get("DROPOUT"))

    monkeypatch.undo()  # (restores .item and the kernels; the recorded launches keep the real ones)
    new_seed = (inp.seed + 7919) % 2**32
    seed.fill_(new_seed)
    spy.replay()
    now = dict(zip(("y", "h_s", "h_t", "coef"), saved)) | dict(zip(GRADS, grads))
    inp2 = dataclasses.replace(inp, seed=new_seed)  # (its seed_t is the refilled tensor)
    check(now, run(EagerBackend(), inp2), reference(inp2), torch.float32, what="replay: ")
    assert not torch.equal(now["y"], first["y"]) and not torch.equal(now["dA_s"], first["dA_s"])


def test_device_guard_selects_the_tensors_gpu(monkeypatch):
    """``launch.device_guard`` is ``torch.cuda.device(x.device)`` for CUDA tensors (the
    launchers use the current device and stream), a no-op for CPU ones."""
    from moecl_kernels.backends import launch

    entered = []

    class FakeCudaDevice:
        def __init__(self, device):
            self.device = device

        def __enter__(self):
            entered.append(self.device)

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(torch.cuda, "device", FakeCudaDevice)
    with launch.device_guard(torch.device("cuda", 1)):
        pass
    with launch.device_guard(torch.device("cpu")):
        pass
    assert entered == [torch.device("cuda", 1)]


@needs_interpreter
@pytest.mark.parametrize("expand", ["addmm", "fused"])
def test_every_launch_runs_under_the_device_guard(monkeypatch, expand):
    from moecl_kernels.backends import launch

    state = {"inside": False, "devices": []}

    class Guard:
        def __init__(self, device):
            state["devices"].append(device)

        def __enter__(self):
            state["inside"] = True

        def __exit__(self, *exc):
            state["inside"] = False

    monkeypatch.setattr(launch, "device_guard", Guard)
    outside = []
    spy = KernelSpy(monkeypatch, stub=True, on_launch=lambda name: outside.append(name) if not state["inside"] else 0)
    inp = make_inputs(Case(T=70), torch.float32)
    b = TritonBackend(expand=expand)
    b.backward(bwd_args(inp, b.forward(fwd_args(inp))))
    assert spy.launches and not outside
    assert state["devices"] == [inp.x["x"].device] * 2


GUARD_BYTES = 1 << 16


@contextlib.contextmanager
def _interpreter_memcheck(name, ranges):
    """Every load and store the Triton interpreter performs (mask on) must fall inside one of
    ``ranges`` ([lo, hi) byte addresses): checked before the access, so an out-of-bounds read
    or write fails the test instead of crashing (or silently corrupting) the process."""
    from triton.runtime import interpreter as ti

    builder = ti.InterpreterBuilder
    if not hasattr(builder, "create_masked_load") or not hasattr(builder, "create_masked_store"):
        pytest.skip("this Triton's interpreter has no masked load/store hooks to check")
    real_load, real_store = builder.create_masked_load, builder.create_masked_store

    def check(ptrs, mask, what):
        addr = np.asarray(ptrs.data, dtype=np.uint64)
        on = np.broadcast_to(np.asarray(mask.data, dtype=bool), addr.shape)
        size = np.uint64(ptrs.get_element_ty().primitive_bitwidth // 8)
        inside = np.zeros(addr.shape, dtype=bool)
        for lo, hi in ranges:
            inside |= (addr >= np.uint64(lo)) & (addr + size <= np.uint64(hi))
        bad = on & ~inside
        assert not bad.any(), f"{name}: out-of-bounds {what} of {int(bad.sum())} elements"

    def load(self, ptrs, mask, *args, **kw):
        check(ptrs, mask, "read")
        return real_load(self, ptrs, mask, *args, **kw)

    def store(self, ptrs, value, mask, *args, **kw):
        check(ptrs, mask, "write")
        return real_store(self, ptrs, value, mask, *args, **kw)

    builder.create_masked_load, builder.create_masked_store = load, store
    try:
        yield
    finally:
        builder.create_masked_load, builder.create_masked_store = real_load, real_store


def _guarded_launch(name, real, grid, args, meta, bad_index=0):
    """Run a kernel with every tensor argument moved into the middle of a buffer whose
    GUARD_BYTES on each side are poisoned, then check the guards: an out-of-bounds write fails
    (and, under ``_interpreter_memcheck``, any access outside the tensors' own bytes).
    Guards of int32 tensors (the routing) hold ``bad_index``, so an out-of-bounds read of an
    index yields a bad token index (as stale GPU memory would), not a crash of the interpreter."""
    moved, new_args = {}, []
    for a in args:
        if not isinstance(a, torch.Tensor):
            new_args.append(a)
            continue
        st = a.untyped_storage()
        key = st.data_ptr()
        if key not in moved:
            orig = torch.empty(0, dtype=torch.uint8).set_(st, 0, (st.nbytes(),), (1,))
            if a.dtype == torch.int32:
                guard = torch.full((GUARD_BYTES // 4,), bad_index, dtype=torch.int32).view(torch.uint8)
            else:
                guard = torch.full((GUARD_BYTES,), 0xA5, dtype=torch.uint8)
            buf = torch.cat([guard, orig, guard])
            moved[key] = (orig, buf, guard)
        buf = moved[key][1]
        new_args.append(torch.empty(0, dtype=a.dtype).set_(
            buf.untyped_storage(), GUARD_BYTES // a.element_size() + a.storage_offset(), a.shape, a.stride()))
    with _interpreter_memcheck(name, [(b.data_ptr() + GUARD_BYTES, b.data_ptr() + GUARD_BYTES + o.numel())
                                      for o, b, _ in moved.values()]):
        real[grid](*new_args, **meta)
    for orig, buf, guard in moved.values():
        n = orig.numel()
        for side, region in (("before", buf[:GUARD_BYTES]), ("after", buf[GUARD_BYTES + n:])):
            assert torch.equal(region, guard), f"{name} wrote out of bounds ({side} a tensor)"
        orig.copy_(buf[GUARD_BYTES:GUARD_BYTES + n])


def _checked_launch(name, real, grid, args, meta):
    """Run a kernel in place under ``_interpreter_memcheck`` of its tensor arguments' storages."""
    ranges = [(a.untyped_storage().data_ptr(), a.untyped_storage().data_ptr() + a.untyped_storage().nbytes())
              for a in args if isinstance(a, torch.Tensor)]
    with _interpreter_memcheck(name, ranges):
        real[grid](*args, **meta)


def _corrupt(ro: Routing, kind: str, T: int, E: int) -> Routing:
    ro = dataclasses.replace(ro, single_task=SINGLE_MIXED, offsets_cpu=None,
                             sorted_idx=ro.sorted_idx.clone(), expert_offsets=ro.expert_offsets.clone())
    if kind in ("indices", "both"):  # tokens outside [0, T): past the end and negative
        ro.sorted_idx[::5] = T + 3
        ro.sorted_idx[1::7] = -2
    if kind in ("offsets", "both"):  # past T, and decreasing
        ro.expert_offsets.copy_(torch.tensor([0, T + 9, 4, T + 40][: E + 1], dtype=torch.int32))
    return ro


@needs_interpreter
@pytest.mark.parametrize("expand", ["addmm", "fused"])
def test_corrupt_routing_stays_in_bounds(monkeypatch, expand, kind="both"):
    """A stale or corrupt routing (indices outside [0, T), offsets past T or decreasing) gives
    wrong numbers but no out-of-bounds access, forward and backward (poisoned guard regions
    around every tensor every kernel touches, and an interpreter memcheck). Fails without the
    offsets clamp (an out-of-bounds read of sorted_idx) and without the index mask (writes)."""
    c = Case(T=70, E=3, r=5)
    inp = make_inputs(c, torch.float32)
    inp.ro = _corrupt(inp.ro, kind, c.T, c.E)
    spy = KernelSpy(monkeypatch, wrap=functools.partial(_guarded_launch, bad_index=c.T + 3))
    b = TritonBackend(expand=expand, tiles=SPLIT_TILES if expand == "fused" else None)
    saved = b.forward(fwd_args(inp))
    b.backward(bwd_args(inp, saved))
    assert "_wgrad_reduce_kernel" in spy.names()
    with pytest.raises(ValueError, match="single_task=3"):  # the host hint is checked (it indexes weights)
        b.forward(dataclasses.replace(fwd_args(inp), single_task=3))


@needs_interpreter
@pytest.mark.parametrize("expand", ["addmm", "fused"])
def test_int64_addressing_of_a_strided_x(monkeypatch, expand):
    """A column-major x with T * d_in > 2**31 elements: the column offsets k * stride_xk pass
    2**31 (int32 would wrap to a wild address). x is a strided view over a 4 GiB (virtual, barely
    touched) buffer; both kernels that read x (shrink, fused expand) and the wgrad read it in place."""
    T, d_in, stride_k = 6, 3, 2**30 + 1
    prev = torch.utils.deterministic.fill_uninitialized_memory
    torch.utils.deterministic.fill_uninitialized_memory = False  # do not write 4 GiB of NaN
    try:
        big = torch.empty((d_in - 1) * stride_k + T, dtype=torch.float16)
    except RuntimeError as e:  # a machine that refuses 4 GiB of address space
        pytest.skip(f"cannot reserve 4 GiB of virtual memory here: {e}")
    finally:
        torch.utils.deterministic.fill_uninitialized_memory = prev
    c = Case(T=T, d_in=d_in, d_out=5, r=2, E=2, routing="mixed")
    inp = make_inputs(c, torch.float16)
    x = big.as_strided((T, d_in), (1, stride_k))
    x.copy_(inp.x["x"])
    assert (d_in - 1) * x.stride(1) >= 2**31
    inp.x["x"] = x
    eager, ref = run(EagerBackend(), inp), reference(inp)
    KernelSpy(monkeypatch, wrap=_checked_launch)  # an int32 wrap reads outside x: a failure, not a crash
    check(run(TritonBackend(expand=expand), inp), eager, ref, torch.float16)
    del inp, x, big


@needs_interpreter
@pytest.mark.parametrize("case,fwd_launches,bwd_launches", [
    (Case(T=70), ["_shrink_kernel", "_expand_kernel"],
     ["_shrink_kernel", "_expand_kernel", "_wgrad_kernel", "_wgrad_reduce_kernel", "_wgrad_kernel",
      "_wgrad_reduce_kernel"]),
    (Case(T=70, routing="none"), ["_shrink_kernel", "_expand_kernel"],  # dA, dB: zeros from the reduce
     ["_shrink_kernel", "_expand_kernel", "_wgrad_kernel", "_wgrad_reduce_kernel", "_wgrad_kernel",
      "_wgrad_reduce_kernel"]),
])
def test_launch_count_and_no_extra_torch_kernels(monkeypatch, case, fwd_launches, bwd_launches):
    """Forward: shrink, expand, and the cuBLAS base GEMM. Backward: shrink, expand + base dgrad,
    and per wgrad one reduce that writes the gradients in their final dtype: no torch.zeros,
    fill, cast or copy kernels besides (every torch op the backend dispatches is recorded)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    allowed = {"empty.memory_format", "new_empty.default", "empty_like.default", "empty_strided.default",
               "addmm_.default", "t.default", "transpose.int", "slice.Tensor", "view.default", "as_strided.default",
               "alias.default", "_reshape_alias.default", "unsqueeze.default", "detach.default"}
    ops = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            ops.append(str(func.overloadpacket.__name__) + "." + func._overloadname)
            return func(*args, **(kwargs or {}))

    inp = make_inputs(case, torch.float32)
    b = TritonBackend()
    b.backward(bwd_args(inp, b.forward(fwd_args(inp))))  # warm-up: caches the trainable-expert index
    spy = KernelSpy(monkeypatch, stub=True)
    fa = fwd_args(inp)
    with Record():
        saved = b.forward(fa)
    assert spy.names() == fwd_launches and ops.count("addmm_.default") == 1
    assert set(ops) <= allowed, sorted(set(ops) - allowed)
    spy.launches.clear()
    ops.clear()
    ba = bwd_args(inp, saved)
    with Record():
        b.backward(ba)
    assert spy.names() == bwd_launches and ops.count("addmm_.default") == 1
    assert set(ops) <= allowed, sorted(set(ops) - allowed)


# ---------------------------------------------------------------------------------------------
# GPU: the same contract on device, compiled kernels, bf16 included

GPU_MATRIX = [
    Case(T=300, d_in=200, d_out=168, r=16, E=5),
    Case(T=300, d_in=200, d_out=168, r=16, E=5, routing="single"),
    Case(T=300, d_in=200, d_out=168, r=16, E=5, routing="skewed"),
    Case(T=300, d_in=200, d_out=168, r=16, E=5, routing="none"),
    Case(T=257, d_in=193, d_out=97, r=1, E=3, gate=False, p=0.0),
    Case(T=1, d_in=256, d_out=128, r=16, E=8, routing="single"),
    Case(T=16, d_in=512, d_out=256, r=16, E=8),  # decode, split-K
    Case(T=2000, d_in=256, d_out=320, r=128, E=3),
]


@gpu
@needs_gpu
@pytest.mark.parametrize("expand", ["addmm", "fused"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("case", GPU_MATRIX, ids=str)
def test_gpu_matrix(case, dtype, expand):
    inp = make_inputs(case, dtype, device="cuda")
    ref, eager = reference(inp), run(EagerBackend(), inp)
    b = TritonBackend(expand=expand)
    check(run(b, inp), eager, ref, dtype)
    first = run(b, inp, deterministic=True)
    check(first, eager, ref, dtype, names=GRADS)
    second = run(b, inp, deterministic=True)
    for k in GRADS:
        if first[k] is not None:
            assert torch.equal(first[k], second[k]), f"{k} not bitwise reproducible with deterministic=True"


@gpu
@needs_gpu
@pytest.mark.parametrize("expand", ["addmm", "fused"])
def test_gpu_strided_inputs(expand):
    _check_strided(Case(T=300, d_in=200, d_out=168, r=16, E=5, routing="skewed"), torch.bfloat16, "cuda", expand)


@gpu
@needs_gpu
def test_gpu_cuda_graph_capture():
    inp = make_inputs(Case(T=64, d_in=128, d_out=96, r=16, E=4), torch.bfloat16, device="cuda")
    b = TritonBackend()
    a = fwd_args(inp)
    uncaptured = run(b, inp)  # compiles every kernel before capture
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        saved = b.forward(a)
        grads = b.backward(bwd_args(inp, saved))
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(saved[0], uncaptured["y"])
    for k, v in zip(GRADS, grads):
        if v is not None:
            torch.testing.assert_close(v, uncaptured[k], rtol=1e-2, atol=1e-2)


@gpu
@needs_gpu
@pytest.mark.parametrize("expand", ["addmm", "fused"])
def test_gpu_graph_replay_with_a_new_seed(expand):
    """A captured forward + backward, replayed after the seed tensor is refilled in place, uses
    the new seed's dropout mask (the kernels read the seed on the device)."""
    c = Case(T=96, d_in=128, d_out=96, r=16, E=4, p=0.2)
    inp = make_inputs(c, torch.bfloat16, device="cuda")
    b = TritonBackend(expand=expand)
    run(b, inp)  # compiles every kernel before capture
    fa = fwd_args(inp)  # (no tensor may be created from host data inside the capture)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        saved = b.forward(fa)
        grads = b.backward(BwdArgs(**fa.__dict__, grad_y=inp.gy, h_s=saved[1], h_t=saved[2], coef=saved[3]))
    new_seed = (inp.seed + 12345) % 2**31
    inp.seed_t.fill_(new_seed)
    graph.replay()
    torch.cuda.synchronize()
    inp2 = dataclasses.replace(inp, seed=new_seed)
    got = dict(zip(("y", "h_s", "h_t", "coef"), saved)) | dict(zip(GRADS, grads))
    check(got, run(EagerBackend(), inp2), reference(inp2), torch.bfloat16, what="replayed with a new seed: ")


@gpu
@needs_gpu
@pytest.mark.parametrize("routing", ["single", "mixed"])
def test_gpu_no_host_sync(routing):
    inp = make_inputs(Case(T=300, d_in=256, d_out=128, r=16, E=4, routing=routing), torch.bfloat16, device="cuda")
    b = TritonBackend()
    for det in (False, True):
        run(b, inp, deterministic=det)  # warm-up: compile, cache the trainable-expert index
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for det in (False, True):
            run(b, inp, deterministic=det)
    finally:
        torch.cuda.set_sync_debug_mode(0)


@gpu
@needs_gpu
def test_gpu_torch_compile():
    c = Case(T=128, d_in=128, d_out=64, r=8, E=4)
    inp = make_inputs(c, torch.bfloat16, device="cuda")

    def f(x):
        return moe_lora_linear(x, *(inp.x[k] for k in ("weight", "bias", "shared_A", "shared_B", "task_A",
                                                          "task_B", "gate_weight")),
                               inp.ro, scale=c.scale, dropout_p=c.p, seed=inp.seed_t, backend="triton")

    torch.testing.assert_close(torch.compile(f, fullgraph=True)(inp.x["x"]), f(inp.x["x"]))

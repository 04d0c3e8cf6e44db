"""One conformance suite: every backend against the float64 reference, with one tolerance table.

Each backend is run through the contract (``FwdArgs`` -> ``forward`` -> ``BwdArgs`` ->
``backward``: outputs, saved tensors and gradients) over one case matrix, and through the
public op (``moe_lora_linear`` + autograd) over a sample of the op's cases. The harness and
the tolerance table are ``backend_harness.py``'s (float64 1e-10, float32 1e-5, float16 and
bfloat16 at most 2x the eager backend's error in the same dtype). What is specific to one
backend -- split-K, tiles, launch counts, graphs, guards, the extension build -- stays in its
own file (``test_triton_backend.py``, ``test_triton_variants.py``, ``test_cuda_backend.py``,
``test_op_eager.py``, ``test_build.py``).

On a machine without a GPU the Triton backends run under the Triton interpreter (float32 and
float16; the interpreter has no bfloat16 arithmetic) and the CUDA backend is skipped with the
reason it does not resolve; on a GPU every kernel backend runs compiled in all three dtypes.
"""

from __future__ import annotations

import itertools
import warnings
from dataclasses import dataclass
from typing import Callable

import pytest
import torch
from backend_harness import Case, check, make_inputs, reference, run
from helpers import RANK_EXPERTS, ROUTINGS, SIZES, op_inputs, token_tasks

from moecl_kernels import backends as bk
from moecl_kernels.backends.eager import EagerBackend
from moecl_kernels.contract import moe_lora_reference
from moecl_kernels.contract.reference import ReferenceBackend
from moecl_kernels.ops import moe_lora_linear
from moecl_kernels.routing import build_routing

pytestmark = pytest.mark.usefixtures("poison_uninitialized_memory")  # tests/conftest.py

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
LOW = (torch.float16, torch.bfloat16) if ON_GPU else (torch.float16,)  # the interpreter does no bf16


def _triton(**kw) -> Callable[[], object]:
    def make():
        from moecl_kernels.backends.triton import TritonBackend

        return TritonBackend(**kw)

    return make


def _gemm_path() -> object:
    """The ``gemm`` variant with its GEMM path forced at every size (decode takes T <= 64 otherwise)."""
    b = _triton(variant="gemm")()
    b._gemm.decode_t = 0
    return b


def _cuda() -> object:
    return bk.get_backend("cuda")


def _everywhere(case: Case) -> bool:
    return True


@dataclass(frozen=True)
class Spec:
    """A backend as the suite runs it: how to build it, its dtypes (``low``: fp16 / bf16 rows,
    added to ``dtypes``), whether it is a kernel backend (GPU, or the Triton interpreter on a
    CPU), and the cases where it takes a path of its own (a variant that shares a path with
    another row is not run twice)."""

    name: str
    make: Callable[[], object]
    dtypes: tuple
    kernel: bool = False
    where: Callable[[Case], bool] = _everywhere

    def __str__(self) -> str:
        return self.name


def _fused_differs(c: Case) -> bool:
    """``fused`` runs the base GEMM in Triton for one-task batches and above the decode size;
    elsewhere it is ``addmm``'s path."""
    return c.routing == "single" or c.T > 64


def _decode_size(c: Case) -> bool:
    """``gemm`` takes its split-K decode path at T <= 64 (``triton-gemm-path`` forces the GEMM)."""
    return c.T <= 64


SPECS = [
    Spec("eager", EagerBackend, (torch.float64, torch.float32)),
    Spec("reference", ReferenceBackend, (torch.float64, torch.float32)),
    Spec("triton-addmm", _triton(variant="addmm"), (torch.float32, *LOW), kernel=True),
    Spec("triton-fused", _triton(variant="fused"), (torch.float32, *LOW), kernel=True, where=_fused_differs),
    Spec("triton-gemm", _triton(variant="gemm"), (torch.float32, *LOW), kernel=True, where=_decode_size),
    Spec("triton-gemm-path", _gemm_path, (torch.float32, *LOW), kernel=True),
    Spec("cuda", _cuda, (torch.float32, *LOW), kernel=True),
]

# odd sizes, r = 1 and 64, E = 1..8, T = 1 and above the decode size (64), one task / one task
# without a host hint / mixed / skewed / no-task rows, experts without tokens, gate and bias on
# and off, dropout on and off
MATRIX = [
    Case(),
    Case(routing="single"),
    Case(routing="single_grouped", E=1),
    Case(routing="skewed", T=40),
    Case(routing="none"),
    Case(routing="mixed", E=4),
    Case(routing="partial", T=20, E=8),
    Case(gate=False, bias=False, p=0.0),
    Case(gate=False, routing="single", p=0.0),
    Case(r=1),
    Case(T=1, routing="single"),
    Case(T=1, routing="none", gate=False),
    Case(T=32, d_in=32, d_out=48, r=8, E=4),  # multiples of the tiles
    Case(T=20, d_in=40, d_out=24, r=64, E=2),  # the "hi" rank bucket
    Case(T=70, routing="mixed"),  # above the decode size: fused base GEMMs
    Case(T=66, r=1, p=0.0, routing="skewed"),
]


def _available(spec: Spec) -> object:
    """The backend, or a skip saying why it cannot run here."""
    if spec.kernel and not ON_GPU:
        from moecl_kernels.backends.triton import backend as tb

        if spec.name == "cuda":
            pytest.skip("the CUDA backend needs a GPU")
        if not tb.INTERPRETED:
            pytest.skip("Triton on a CPU needs TRITON_INTERPRET=1 before triton is imported (tests/conftest.py)")
    if spec.name == "cuda":
        try:
            bk.resolve_backend("cuda", torch.empty(1, device=DEVICE, dtype=torch.bfloat16))
        except (bk.BackendUnavailableError, ValueError) as e:
            pytest.skip(str(e))
    return spec.make()


def _marks(kernel: bool) -> tuple:
    """Kernel rows on a GPU are ``gpu`` tests (``-m gpu``, benchmarks/run_gpu.sh); on a CPU they
    run interpreted in the default run."""
    return (pytest.mark.gpu,) if kernel and ON_GPU else ()


def _runs():
    for spec in SPECS:
        for case in MATRIX:
            if spec.where(case):
                for dtype in spec.dtypes:
                    yield pytest.param(spec, case, dtype, id=f"{spec}-{case}-{str(dtype)[6:]}", marks=_marks(spec.kernel))


@pytest.mark.parametrize("spec,case,dtype", list(_runs()))
def test_backend_conforms(spec, case, dtype):
    """Outputs, saved tensors and gradients (the kernels' default weight-gradient mode; the
    ``deterministic=True`` paths are in the per-backend files)."""
    backend = _available(spec)
    inp = make_inputs(case, dtype, device=DEVICE if spec.kernel else "cpu")
    ref = reference(inp)
    eager = run(EagerBackend(), inp) if dtype != torch.float64 and spec.name != "eager" else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a variant saying it falls back on unaligned rows
        got = run(backend, inp)
    check(got, eager, ref, dtype, what=f"{spec} {case} {dtype}: ")


# ---------------------------------------------------------------------------------------------
# through the public op: moe_lora_linear(..., backend=name) and autograd

OP_CASES = [
    (SIZES[i % len(SIZES)], r, E, routing, gate, p)
    for i, ((r, E), routing, gate, p) in enumerate(itertools.product(RANK_EXPERTS, ROUTINGS, (True, False), (0.0, 0.1)))
]
OP_GRADS = ("x", "shared_A", "shared_B", "task_A", "task_B", "gate_weight")
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16) if ON_GPU else (torch.float32,)
OP_BACKENDS = {"eager": (torch.float64, torch.float32), "reference": (torch.float64, torch.float32),
               "triton": KERNEL_DTYPES, "cuda": KERNEL_DTYPES}


def op_run(backend: str, case, dtype, device: str, seed: int):
    """The op's output and input gradients, and the float64 reference's."""
    (T, d_in, d_out), r, E, routing, gate, p = case
    inp, g = op_inputs(T, d_in, d_out, r, E, dtype=dtype, gate=gate, seed=seed, device=device)
    tt = token_tasks(routing, T, E, g)
    y = moe_lora_linear(**inp, routing=build_routing(tt, E, T, device=device), scale=1.7, dropout_p=p,
                        seed=torch.tensor(1234 + seed, device=device), backend=backend)
    return _with_reference(y, inp, g, device, dtype, token_task=tt, scale=1.7, dropout_p=p, seed=1234 + seed)


def _with_reference(y, inp: dict, g, device, dtype, **ref_kw):
    """(the op's output and input gradients, the float64 reference's) for one random upstream gradient."""
    leaf = {k: (v.detach().cpu().double().requires_grad_(v.requires_grad) if v is not None else None)
            for k, v in inp.items()}
    y_ref = moe_lora_reference(**leaf, **ref_kw)
    gy = torch.randn(y.shape, generator=g, dtype=torch.float64)
    names = [n for n in OP_GRADS if inp[n] is not None]
    got = torch.autograd.grad(y, [inp[n] for n in names], gy.to(device, dtype))
    want = torch.autograd.grad(y_ref, [leaf[n] for n in names], gy)
    return {"y": y, **dict(zip(names, got))}, {"y": y_ref.detach(), **dict(zip(names, want))}


def _op_runs():
    for name, dtypes in OP_BACKENDS.items():
        # eager: the whole matrix; compiled kernels on a GPU too (fp32; fp16 / bf16: the sample);
        # the (slow, per-token) reference and the Triton interpreter: a spread sample
        kernel = name in ("triton", "cuda")
        sample = OP_CASES[::7] if name == "reference" else [c for c in OP_CASES if c[2] <= 4][::10]  # E <= 4: interpreter time
        for case, dtype in itertools.product(OP_CASES, dtypes):
            full = name == "eager" or (ON_GPU and kernel and dtype == torch.float32)
            if not full and case not in sample:
                continue
            size, r, E, routing, gate, p = case
            yield pytest.param(name, case, dtype, id=f"{name}-{size}-r{r}-E{E}-{routing}-gate{gate}-p{p}-{str(dtype)[6:]}",
                               marks=_marks(kernel))


def _device_or_skip(backend: str, dtype) -> str:
    """The device the backend runs on here; the test is skipped where it cannot run."""
    device = DEVICE if backend in ("triton", "cuda") else "cpu"
    try:
        bk.resolve_backend(backend, torch.empty(1, device=device, dtype=dtype))
    except (bk.BackendUnavailableError, ValueError) as e:
        pytest.skip(str(e))
    return device


@pytest.mark.parametrize("backend,case,dtype", list(_op_runs()))
def test_op_conforms(backend, case, dtype):
    device = _device_or_skip(backend, dtype)
    seed = hash((case, str(dtype))) % 10_000
    got, want = op_run(backend, case, dtype, device, seed)
    eager = op_run("eager", case, dtype, device, seed)[0] if dtype in (torch.float16, torch.bfloat16) else None
    check(got, eager, want, dtype, what=f"{backend} {case}: ")


def test_every_registered_backend_is_in_the_suite():
    """A backend registered without a row here would escape the conformance suite."""
    covered = {s.name for s in SPECS} | set(OP_BACKENDS)
    missing = [n for n in bk.registered_backends() if n not in covered and n != "auto"]
    assert not missing, f"registered backends without conformance rows: {missing}"



# ---------------------------------------------------------------------------------------------
# frozen tasks (mk.freeze_task): per-task snapshots of the shared expert and gate, every backend

def snapshot_inputs(r, d_in, d_out, E, gate, g, dtype=torch.float64, device="cpu", num_slots=2):
    """Snapshot stacks for ``num_slots`` slots and a task -> slot map freezing tasks 0 and 2 (when present)."""
    def rnd(*shape, scale):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype=dtype, device=device)

    slots = [-1] * E
    for f, k in enumerate(k for k in (2, 0) if k < E):
        slots[k] = f
    return dict(snap_shared_A=rnd(num_slots, r, d_in, scale=d_in**-0.5), snap_shared_B=rnd(num_slots, d_out, r, scale=r**-0.5),
                snap_gate=rnd(num_slots, 2, d_in, scale=d_in**-0.5) if gate else None,
                task_slot=torch.tensor(slots, device=device))


FROZEN_CASES = [((37, 29, 23), 5, 4, "partial", True, 0.1), ((37, 29, 23), 5, 4, "mixed", False, 0.0),
                ((5, 7, 3), 1, 1, "single", True, 0.1), ((64, 48, 33), 8, 3, "skewed", True, 0.0),
                ((20, 9, 11), 3, 3, "none", True, 0.1)]


def frozen_op_run(backend: str, case, dtype, device: str, seed: int, grouped: bool = False):
    """As :func:`op_run` with frozen tasks; ``grouped``: a routing without host offsets."""
    (T, d_in, d_out), r, E, routing, gate, p = case
    inp, g = op_inputs(T, d_in, d_out, r, E, dtype=dtype, gate=gate, seed=seed, device=device)
    snaps = snapshot_inputs(r, d_in, d_out, E, gate, g, dtype, device)
    tt = token_tasks(routing, T, E, g)
    R = build_routing(tt, E, T, device=device)
    if grouped:
        R.offsets_cpu = None
        R.single_task = -2 if R.single_task >= 0 else R.single_task
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a kernel backend saying it runs frozen tasks on eager
        y = moe_lora_linear(**inp, routing=R, scale=1.7, dropout_p=p, seed=torch.tensor(99 + seed, device=device),
                            backend=backend, **snaps)
    s64 = {k: (v.cpu().double() if k != "task_slot" else v.cpu()) if v is not None else None for k, v in snaps.items()}
    return _with_reference(y, inp, g, device, dtype, token_task=tt, scale=1.7, dropout_p=p, seed=99 + seed, **s64)


def _frozen_runs():
    for name, dtypes in OP_BACKENDS.items():
        for case, dtype, grouped in itertools.product(FROZEN_CASES, dtypes, (False, True)):
            if dtype != dtypes[0] and grouped:
                continue
            yield pytest.param(name, case, dtype, grouped, id=f"{name}-{case[3]}-E{case[2]}-gate{case[4]}-p{case[5]}-"
                               f"{str(dtype)[6:]}{'-grouped' if grouped else ''}")


@pytest.mark.parametrize("backend,case,dtype,grouped", list(_frozen_runs()))
def test_op_conforms_with_frozen_tasks(backend, case, dtype, grouped):
    """A mixed batch with frozen tasks' tokens, in one call: y and every live gradient against the
    float64 reference (kernel backends without snapshot kernels run it on eager, said once)."""
    device = _device_or_skip(backend, dtype)
    seed = hash((case, str(dtype))) % 10_000
    got, want = frozen_op_run(backend, case, dtype, device, seed, grouped)
    eager = frozen_op_run("eager", case, dtype, device, seed, grouped)[0] if dtype in (torch.float16, torch.bfloat16) \
        else None
    check(got, eager, want, dtype, what=f"{backend} {case} frozen: ")


def test_reference_frozen_tokens_match_the_snapshot_as_live():
    """The reference's semantics, against an independent oracle: a frozen task's tokens get exactly
    what the plain formula gives with that task's snapshot in place of the live shared expert and gate;
    every other token gets the live one."""
    (T, d_in, d_out), r, E = (37, 29, 23), 5, 4
    inp, g = op_inputs(T, d_in, d_out, r, E)
    snaps = snapshot_inputs(r, d_in, d_out, E, True, g)
    tt = token_tasks("partial", T, E, g)
    kw = dict(token_task=tt, scale=1.7, dropout_p=0.1, seed=7)
    y = moe_lora_reference(**inp, **kw, **snaps)
    y_live = moe_lora_reference(**inp, **kw)
    slots = snaps["task_slot"].tolist()
    for k in range(E):
        m = tt == k
        if slots[k] < 0:
            torch.testing.assert_close(y[m], y_live[m], rtol=1e-12, atol=1e-12)
            continue
        f = slots[k]
        y_k = moe_lora_reference(**dict(inp, shared_A=snaps["snap_shared_A"][f], shared_B=snaps["snap_shared_B"][f],
                                        gate_weight=snaps["snap_gate"][f]), **kw)
        torch.testing.assert_close(y[m], y_k[m], rtol=1e-12, atol=1e-12)
        assert (y[m] - y_live[m]).abs().max() > 1e-3  # the snapshot matters
    torch.testing.assert_close(y[tt < 0], y_live[tt < 0], rtol=1e-12, atol=1e-12)

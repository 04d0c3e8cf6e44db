"""The cuda backend: its build, its errors, and (on a GPU) its numerics.

CPU tests (always): the reasons the backend gives when it cannot run, the one-time
fallback warning, the launch plan (splits, device guard, seed pointer, strides) against a
recording extension, and the extension's own checks when it is built. The build (setup.py,
the compile-check parser) is tests/test_build.py.

GPU tests (``-m gpu``; skipped without CUDA or without ``moecl_kernels._C``): the matrix
every backend runs is tests/test_conformance.py; here the kernels' own paths (r = 33 and 128, several tiles, decode
T = 1 and 16, frozen experts, task ids on host or device, forced split counts), strided
layouts, determinism and CUDA-graph capture, with every torch.empty poisoned (NaN). Accuracy
rule: fp32 <= 1e-5 relative (max-abs / max-abs); fp16/bf16 at most 2x the eager backend's
error in the same dtype (floor eps, see ``check``), both against a float64 reference that
uses the contract's dtype-rounded dropout input.
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path
from types import ModuleType, SimpleNamespace
from unittest import mock

import pytest
import torch
from helpers import op_inputs, token_tasks

import moecl_kernels
from moecl_kernels import backends
from moecl_kernels.backends import cuda as cuda_mod
from moecl_kernels.contract import SINGLE_MIXED
from moecl_kernels.contract.args import SNAPSHOT_FIELDS
from moecl_kernels.contract import reference as reference_module
from moecl_kernels.contract import apply_dropout
from moecl_kernels.ops.custom_ops import BWD_SCHEMA_ARGS, call_args, moe_lora_bwd, moe_lora_fwd
from moecl_kernels.ops.linear import moe_lora_linear
from moecl_kernels.contract import moe_lora_reference
from moecl_kernels.routing import build_routing

ROOT = Path(__file__).resolve().parent.parent
FAKE_CUDA_X = SimpleNamespace(device=torch.device("cuda", 0), dtype=torch.bfloat16)


def _cuda_ready() -> bool:
    return torch.cuda.is_available() and cuda_mod.load_extension()[0] is not None


def gpu_test(fn):
    reason = "needs a CUDA GPU and the built extension moecl_kernels._C (pip install --no-build-isolation .)"
    return pytest.mark.gpu(pytest.mark.skipif(not _cuda_ready(), reason=reason)(fn))


@pytest.fixture
def fresh_extension_state(monkeypatch):
    """Forget the cached extension load and the one-time warnings for the duration of a test."""
    monkeypatch.setattr(cuda_mod, "_extension_state", None)
    monkeypatch.setattr(backends, "_warned", set())


# ---------------------------------------------------------------------------------------------
# CPU: reasons and errors


def test_cpu_tensor_reason():
    why = cuda_mod.CudaBackend().unavailable_reason(torch.zeros(2, 3))
    assert why == "x is on cpu; the cuda backend needs CUDA tensors"


def test_explicit_cuda_request_with_cpu_tensors_raises():
    T, d, r, E = 4, 6, 2, 2
    x = torch.randn(T, d)
    routing = build_routing(torch.tensor([0, 1, -1, 0]), E, T)
    with pytest.raises(backends.BackendUnavailableError, match="backend='cuda' is unavailable: x is on cpu"):
        moe_lora_linear(x, torch.randn(5, d), None, torch.randn(r, d), torch.randn(5, r), torch.randn(E, r, d),
                        torch.randn(E, 5, r), None, routing, scale=1.0, backend="cuda")


def test_fp64_reason():
    x = SimpleNamespace(device=torch.device("cuda", 0), dtype=torch.float64)
    why = cuda_mod.CudaBackend().unavailable_reason(x)
    assert "torch.float64" in why and "fp32, fp16 and bf16" in why


def test_not_built_reason_and_one_warning(fresh_extension_state, monkeypatch):
    from moecl_kernels import backends

    monkeypatch.setattr(cuda_mod, "_extension_state", (None, cuda_mod.NOT_BUILT))
    monkeypatch.setattr(backends, "_warned", set())
    # a measured table that prefers cuda on this GPU: then its absence deserves a warning
    monkeypatch.setattr(backends, "device_arch", lambda device: "sm_90")
    monkeypatch.setattr(backends, "auto_table", lambda: {"default": ["triton", "cuda", "eager"],
                                                         "measured": {"sm_90": {"bf16": ["cuda", "triton", "eager"]}}})
    b = cuda_mod.CudaBackend()
    reasons = [b.unavailable_reason(FAKE_CUDA_X) for _ in range(3)]
    assert all(why == cuda_mod.NOT_BUILT for why in reasons)
    assert "not built" in reasons[0]
    assert "pip install --no-build-isolation ." in reasons[0] and "MOECL_FORCE_CUDA_BUILD=1" in reasons[0]
    # auto falls back with one warning (per device/dtype), an explicit request raises
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        chosen = [backends.resolve_backend("auto", FAKE_CUDA_X) for _ in range(3)]
    assert len(set(chosen)) == 1 and chosen[0] != "cuda"
    fallback = [w for w in caught if "backend 'cuda' is unavailable" in str(w.message)]
    assert len(fallback) == 1 and issubclass(fallback[0].category, RuntimeWarning)
    assert "not built" in str(fallback[0].message)
    with pytest.raises(backends.BackendUnavailableError, match="backend='cuda' is unavailable: the CUDA extension"):
        backends.resolve_backend("cuda", FAKE_CUDA_X)


def test_auto_prefers_triton_until_a_committed_measurement_says_otherwise(monkeypatch):
    """auto's order comes from backends/auto_choice.json: per GPU arch and case when measured,
    else its default (triton, cuda, eager); a constant priority in the code no longer decides."""
    table = backends.auto_table()
    assert table["default"] == ["triton", "cuda", "eager"] and table["measured"] == {}  # nothing measured yet
    monkeypatch.setattr(backends, "_reason", lambda name, x: None if name in ("eager", "triton", "cuda") else "no")
    monkeypatch.setattr(backends, "device_arch", lambda device: "sm_90")
    gpu = torch.device("cuda", 0)

    def x(tokens, dtype=torch.bfloat16):
        return SimpleNamespace(device=gpu, dtype=dtype, shape=(tokens, 64))

    assert backends.resolve_backend("auto", x(4096)) == "triton" == backends.resolve_backend("auto", x(16))
    measured = {"default": ["triton", "cuda", "eager"],
                "measured": {"sm_90": {"bf16/decode": ["cuda", "triton", "eager"], "fp16": ["eager"],
                                       "*": ["gone", "cuda"]}}}
    monkeypatch.setattr(backends, "auto_table", lambda: measured)
    assert backends.resolve_backend("auto", x(16)) == "cuda"                  # the measured decode entry
    assert backends.resolve_backend("auto", x(16, torch.float16)) == "eager"  # a dtype-wide entry
    assert backends.resolve_backend("auto", x(4096)) == "cuda"                # "*": unknown names skipped
    monkeypatch.setattr(backends, "device_arch", lambda device: "sm_80")
    assert backends.resolve_backend("auto", x(16)) == "triton"                # no entry for sm_80: the default
    # names the order leaves out follow it by priority; reference (negative) comes last
    order = backends.auto_order("sm_80", "bf16/decode")
    assert order[:3] == ["triton", "cuda", "eager"] and order[-1] == "reference"
    assert backends.case_key(torch.bfloat16, 64) == "bf16/decode" and backends.case_key(torch.float32, 65) == "fp32/large"
    assert backends.case_key(torch.float16, None) == "fp16"  # a symbolic token count under torch.compile
    # the trace-time choice carries the token count in a memory-free probe (or none: dtype-only key)
    assert backends._choose_constant("auto", "cpu", None, torch.float32, 4, 2, 16) == "eager"
    assert backends._choose_constant("auto", "cpu", None, torch.float32, 4, 2, -1) == "eager"


def test_missing_extension_is_reported_as_not_built(fresh_extension_state):
    if cuda_mod.importlib.util.find_spec("moecl_kernels._C") is not None:
        pytest.skip("the extension is built here")
    assert cuda_mod.load_extension() == (None, cuda_mod.NOT_BUILT)


def test_stale_extension_reason(fresh_extension_state, monkeypatch):
    fake = ModuleType("moecl_kernels._C")
    fake.__version__ = "0.0.0-old"
    monkeypatch.setattr(moecl_kernels, "_C", fake, raising=False)
    ext, why = cuda_mod.load_extension()
    assert ext is None
    assert f"built for moecl-kernels 0.0.0-old but the package is {moecl_kernels.__version__}" in why
    assert "pip install --no-build-isolation ." in why


@pytest.mark.parametrize(
    "archs, capability, ok",
    [
        (["sm_80", "sm_90a"], (8, 0), True),
        (["sm_80", "sm_90a"], (8, 6), True),   # sm_80 SASS runs on 8.x
        (["sm_80", "sm_90a"], (9, 0), True),
        (["sm_80", "sm_90a"], (10, 0), False),  # no SASS for Blackwell and no PTX
        (["sm_90a"], (8, 9), False),
        (["sm_80", "compute_80"], (10, 0), True),  # PTX JIT
        (["sm_90a"], (9, 1), False),          # arch-specific SASS: exactly 9.0
        (["sm_86"], (8, 0), False),
    ],
)
def test_arch_supported(archs, capability, ok):
    assert cuda_mod.arch_supported(archs, capability) is ok


# ---------------------------------------------------------------------------------------------
# CPU: what the backend launches, with a recording stand-in for the extension (nothing runs)


class RecordingExtension:
    """Stands in for moecl_kernels._C: every launcher call is recorded with its arguments."""

    __version__ = moecl_kernels.__version__

    def __init__(self):
        self.calls: list[tuple[str, dict]] = []
        self.guarded = []  # per call: was it made inside the device guard?
        self.in_guard = False
        self.guard_devices = []

    def build_info(self):
        return dict(version=self.__version__, archs=["sm_90a"], max_rank=128, max_experts=64, max_splits=1024,
                    tile=64, rank_chunk=32)

    def __getattr__(self, name):
        def launcher(**kw):
            self.calls.append((name, kw))
            self.guarded.append(self.in_guard)
        return launcher

    def named(self, name):
        return [kw for n, kw in self.calls if n == name]


@pytest.fixture
def recording_extension(monkeypatch):
    """The cuda backend on CPU tensors, its launches recorded: 16 SMs, compute capability 9.0."""
    from moecl_kernels.backends import launch

    ext = RecordingExtension()
    monkeypatch.setattr(cuda_mod, "_extension_state", (ext, None))
    monkeypatch.setattr(cuda_mod, "_build_info", ext.build_info)
    monkeypatch.setattr(cuda_mod, "_device_info", lambda index: ((9, 0), 16))
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: SimpleNamespace(cuda_stream=0))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    real_guard = launch.device_guard

    class Guard:
        def __init__(self, device):
            ext.guard_devices.append(device)
            self.inner = real_guard(device)

        def __enter__(self):
            ext.in_guard = True
            return self.inner.__enter__()

        def __exit__(self, *exc):
            ext.in_guard = False
            return self.inner.__exit__(*exc)

    monkeypatch.setattr(launch, "device_guard", Guard)
    return ext


def _cuda_args(T=96, d_in=160, d_out=96, r=8, E=4, routing="partial", p=0.1, host_ids=True, seed=None,
               x_layout=None):
    from moecl_kernels.contract import BwdArgs, FwdArgs

    inp, g = op_inputs(T, d_in, d_out, r, E, dtype=torch.float32, seed=3)
    t = {k: (v.detach() if v is not None else None) for k, v in inp.items()}
    if x_layout is not None:
        t["x"] = x_layout(t["x"])
    tt = token_tasks(routing, T, E, g)
    rt = build_routing(tt, E, T)
    if not host_ids:
        rt.single_task, rt.offsets_cpu = SINGLE_MIXED, None
    fa = FwdArgs(**t, token_task=rt.token_task, sorted_idx=rt.sorted_idx, expert_offsets=rt.expert_offsets,
                 offsets_cpu=rt.offsets_cpu, single_task=rt.single_task, scale=2.0, dropout_p=p,
                 seed=seed if seed is not None else torch.tensor(11))
    acc = torch.zeros(T, r)
    ba = BwdArgs(**fa.__dict__, grad_y=torch.randn(T, d_out, generator=g), h_s=acc, h_t=acc,
                 coef=torch.zeros(T, 2))
    return fa, ba


def test_dropout_seed_reaches_the_kernels_as_a_device_pointer(recording_extension, monkeypatch):
    """Graph-safe dropout: the launchers get the seed's address, never its value (no .item()), so
    a captured graph replayed after the seed tensor is refilled in place draws a new mask."""
    ext = recording_extension
    seed = torch.tensor(1234)
    fa, ba = _cuda_args(seed=seed)
    monkeypatch.setattr(torch.Tensor, "item", lambda self: pytest.fail("the cuda backend read a value with .item()"))
    b = cuda_mod.CudaBackend()
    b.forward(fa)
    b.backward(ba)
    n = len(ext.calls)
    seed.fill_(98765)  # what a replay after a new draw into the same tensor sees
    b.forward(fa)
    b.backward(ba)
    first, second = ([kw["dropout"] for _, kw in calls if "dropout" in kw] for calls in (ext.calls[:n], ext.calls[n:]))
    from moecl_kernels.contract.dropout import threshold24

    on = (True, seed.data_ptr(), threshold24(0.1), 1.0 / 0.9)
    assert on in first and all(d in (on, cuda_mod._NO_DROPOUT) for d in first)
    assert sum(d == on for d in first) == 4  # forward shrink; backward expand, wgrad dA_s and dA
    assert second == first  # identical launch arguments: the value lives only on the device


def test_launches_run_under_the_device_guard(recording_extension):
    ext = recording_extension
    fa, ba = _cuda_args()
    b = cuda_mod.CudaBackend()
    b.forward(fa)
    b.backward(ba)
    assert ext.calls and all(ext.guarded)
    assert ext.guard_devices == [fa.x.device, fa.x.device]


@pytest.mark.parametrize("layout", ["contiguous", "column_major", "padded_rows"])
def test_token_matrix_with_other_strides_is_copied_once(recording_extension, layout):
    """The kernels need unit feature stride: a strided x is copied once per call, not per kernel."""
    views = {"contiguous": None, "column_major": lambda t: t.t().contiguous().t(),
             "padded_rows": lambda t: torch.cat([t, t], dim=1)[:, : t.shape[1]]}
    ext = recording_extension
    fa, ba = _cuda_args(x_layout=views[layout], d_in=160, d_out=96)
    x = fa.x
    b = cuda_mod.CudaBackend()
    b.forward(fa)
    (shrink_fwd,) = ext.named("shrink")
    ext.calls.clear()
    b.backward(ba)
    x_reads = [kw["q"] for kw in ext.named("wgrad") if kw["C"] == x.shape[1]]  # dA_s, dA, dgate
    assert len(x_reads) == 3 and len(set(x_reads)) == 1
    if layout == "column_major":
        assert shrink_fwd["input"] != x.data_ptr() and x_reads[0] != x.data_ptr()  # one copy per call
    else:  # unit feature stride already: read in place (padded rows through ld_input)
        assert shrink_fwd["input"] == x.data_ptr() == x_reads[0]
        assert shrink_fwd["ld_input"] == x.stride(0)


def test_wgrad_splits_count_only_experts_with_tokens(recording_extension):
    """One task of eight, all trainable: the per-expert wgrads split that expert's tokens to fill
    the GPU (16 SMs here) instead of sizing the splits for eight experts' worth of blocks."""
    ext = recording_extension
    T, d_in, d_out, r, E = 4096, 512, 384, 8, 8
    _, ba = _cuda_args(T=T, d_in=d_in, d_out=d_out, r=r, E=E, routing="single", p=0.0)
    cuda_mod.CudaBackend().backward(ba)
    per_expert = {kw["C"]: kw for kw in ext.named("wgrad") if kw["per_expert"]}
    dA, dB = per_expert[d_in], per_expert[d_out]
    # dA: 8 column tiles x 1 row tile x 1 expert with tokens -> ceil(2 * 16 / 8) = 4 splits of 1024 tokens
    assert dA["splits"] == 4 and dB["splits"] == 6  # dB: 6 column tiles -> ceil(32 / 6) = 6
    assert dA["workspace_elems"] == E * 4 * r * d_in  # slots for every trainable expert (launcher layout)
    # the sizing rule itself
    tokens = [0, 0, 3000, 0, 0, 1096, 0, 0]
    assert cuda_mod.wgrad_jobs(tokens, 0xFF, T) == (2, 3000)
    assert cuda_mod.wgrad_jobs(tokens, 0b1111_1011, T) == (1, 1096)  # expert 2 frozen
    assert cuda_mod.wgrad_jobs(tokens, 0b1101_1011, T) == (0, 0)     # no trainable expert has tokens
    assert cuda_mod.wgrad_jobs(None, 0xFF, T) == (8, 512)            # device task ids: an even share assumed
    assert cuda_mod.wgrad_jobs(tokens, None, T) == (1, T)            # shared expert / gate: all tokens


def _extension():
    ext, _ = cuda_mod.load_extension()
    if ext is None:
        pytest.skip("the extension moecl_kernels._C is not built")
    return ext


def test_extension_build_info():
    info = _extension().build_info()
    assert info["version"] == moecl_kernels.__version__
    assert info["archs"] and all(a.startswith(("sm_", "compute_")) for a in info["archs"])
    assert info["max_rank"] == 128 and info["max_experts"] == 64


def test_extension_argument_errors_name_the_argument():
    ext = _extension()
    route = (0, 0, 0, 3, 1)
    with pytest.raises(ValueError, match=r"moecl.shrink: r=129 is outside \[1, 128\]"):
        ext.shrink(dtype=2, input=16, ld_input=4, K=4, shared=(16, 4, 1, 0), task=(16, 4, 1, 16), r=129, gate=0,
                   route=route, dropout=(False, 0, 0, 1.0), partial=16, partial_elems=10**6, splits=1, stream=0)
    with pytest.raises(ValueError, match="moecl.expand: out is null"):
        ext.expand(dtype=0, out=0, ld_out=8, N=8, h_shared=16, h_task=16, r=2, coef=0, scale=1.0,
                   shared=(16, 2, 1, 0), task=(16, 2, 1, 16), route=route, dropout=(False, 0, 0, 1.0), dlogits=0,
                   gate=0, stream=0)
    with pytest.raises(ValueError, match="moecl.shrink: dropout seed is null"):  # the seed is a device pointer
        ext.shrink(dtype=2, input=16, ld_input=4, K=4, shared=(16, 4, 1, 0), task=(16, 4, 1, 16), r=4, gate=0,
                   route=route, dropout=(True, 0, 1, 1.0), partial=16, partial_elems=10**6, splits=1, stream=0)
    with pytest.raises(ValueError, match="dtype code 5"):
        ext.wgrad(dtype=5, p=0, ld_p=2, rows=2, coef=0, coef_col=0, scale=1.0, q=0, ld_q=4, C=4,
                  dropout=(False, 0, 0, 1.0), route=route, per_expert=False, trainable=0, out=16, out_stride_m=4,
                  out_stride_c=1, out_stride_e=0, workspace=0, workspace_elems=0, splits=1, stream=0)


# ---------------------------------------------------------------------------------------------
# GPU: numerics against the float64 reference

DEVICE = "cuda"
EPS = {torch.float32: 2.0**-23, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
GRAD_NAMES = ("x", "shared_A", "shared_B", "task_A", "task_B", "gate_weight")
SCALE, DROP_SEED = 1.7, 1234

# The matrix every backend runs is tests/test_conformance.py.
# Kernel-specific paths: rank chunks (r > 32, r = 128), several token / column tiles, decode
# (split-K), frozen experts.
KERNEL_CASES = {
    "r128": ((40, 64, 48), 128, 2, "partial", True, 0.1, None),
    "r33_tiles": ((130, 300, 260), 33, 5, "partial", True, 0.05, [False, True, False, True, True]),
    "decode_1": ((1, 256, 128), 8, 3, "single", True, 0.0, None),
    "decode_16": ((16, 512, 320), 16, 8, "partial", True, 0.0, None),
    "skewed_frozen": ((200, 96, 80), 16, 4, "skewed", True, 0.05, [True, False, True, True]),
    "all_frozen": ((33, 40, 24), 4, 3, "partial", True, 0.1, [False, False, False]),
}


pytestmark = pytest.mark.usefixtures("poison_uninitialized_memory")  # tests/conftest.py


def max_rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    d = (got.detach().double().cpu() - ref.cpu()).abs().max().item()
    scale = ref.abs().max().item()
    return d / scale if scale > 0 else d


def make_case(size, r, E, routing, gate, p, seed=0, bias=True):
    """float64 CPU masters (helpers.op_inputs), per-token task ids and the output gradient."""
    T, d_in, d_out = size
    inp, g = op_inputs(T, d_in, d_out, r, E, dtype=torch.float64, gate=gate, seed=seed, bias=bias)
    tt = token_tasks(routing, T, E, g)
    gy = torch.randn(T, d_out, generator=g, dtype=torch.float64)
    return inp, tt, gy, E, p


def run_backend(case, dtype, backend, device=None, host_ids=True, trainable=None, deterministic=False, views=None,
                drop_seed=DROP_SEED):
    """y and the grads from moe_lora_linear in ``dtype`` (inputs rounded from the float64 masters).

    host_ids: task ids on the host (exact grids, single-task fast path) or on the device (upper-bound
    grids, grouped path). views: optional {name: fn} applied to the dtype tensors (strided layouts).
    """
    inp, tt, gy, E, p = case
    device = device or DEVICE
    t = {}
    for k, v in inp.items():
        if v is None:
            t[k] = None
            continue
        w = v.detach().to(device=device, dtype=dtype)
        if views and k in views:
            w = views[k](w)
        t[k] = w.requires_grad_(v.requires_grad)
    routing = build_routing(tt if host_ids else tt.to(device), E, tt.shape[0], device=device)
    y = moe_lora_linear(**t, routing=routing, scale=SCALE, dropout_p=p, seed=torch.tensor(drop_seed),
                        expert_trainable=trainable, deterministic=deterministic, backend=backend)
    names = [n for n in GRAD_NAMES if t[n] is not None]
    grads = torch.autograd.grad(y, [t[n] for n in names], gy.to(device=device, dtype=dtype))
    return dict(y=y.detach(), **dict(zip(names, grads)))


def run_reference(case, dtype, trainable=None, drop_seed=DROP_SEED):
    """float64 y and grads on the dtype-rounded inputs; frozen experts' grads zeroed.

    The contract rounds the dropped-out LoRA input x~ = x * keep / (1 - p) to the activation
    dtype (every backend does, bit-exactly), so the reference uses that rounded x~ too (with
    the exact mask as its derivative): what is measured is each backend's own arithmetic.
    """
    inp, tt, gy, _, p = case

    def dropout_rounded_like_backends(x, p, seed):
        exact = apply_dropout(x, p, seed)
        return exact + (apply_dropout(x.detach().to(dtype), p, seed).double() - exact).detach()

    t = {k: (v.detach().to(dtype).double().requires_grad_(v.requires_grad) if v is not None else None)
         for k, v in inp.items()}
    with mock.patch.object(reference_module, "apply_dropout", dropout_rounded_like_backends):
        y = moe_lora_reference(**t, token_task=tt, scale=SCALE, dropout_p=p, seed=drop_seed)
    names = [n for n in GRAD_NAMES if t[n] is not None]
    grads = torch.autograd.grad(y, [t[n] for n in names], gy.to(dtype).double())
    out = dict(y=y.detach(), **dict(zip(names, grads)))
    if trainable is not None:
        frozen = [not tr for tr in trainable]
        for k in ("task_A", "task_B"):
            out[k] = out[k].clone()
            out[k][frozen] = 0
    return out


def check(got: dict, eager: dict, ref: dict, dtype, what=""):
    """fp32: <= 1e-5 relative; fp16/bf16: <= 2x the eager backend's error; zeros stay exact.

    The fp16/bf16 floor is eps (relative to the largest reference value): a result computed
    exactly still carries two roundings to dtype at that magnitude (the base GEMM's output
    and the final sum), and on the matrix's tiny outputs eager's own roundings can land
    closer by luck. Real defects (a missed term, a wrong expert, a wrong mask) are far larger.
    """
    for k, r in ref.items():
        assert torch.isfinite(got[k]).all(), f"{what}{k}: non-finite values (unwritten output?)"
        if r.abs().max() == 0:  # task grads without task tokens, frozen experts, unused gate
            assert (got[k] == 0).all(), f"{what}{k}: expected exact zeros"
            continue
        e = max_rel_err(got[k], r)
        tol = 1e-5 if dtype == torch.float32 else max(2 * max_rel_err(eager[k], r), EPS[dtype])
        assert e <= tol, f"{what}{k}: relative error {e:.3g} > {tol:.3g}"


def compare(case, dtype, trainable=None, what="", **kw):
    ref = run_reference(case, dtype, trainable)
    eager = run_backend(case, dtype, "eager", trainable=trainable)
    check(run_backend(case, dtype, "cuda", trainable=trainable, **kw), eager, ref, dtype, what)


@gpu_test
@pytest.mark.parametrize("host_ids", [True, False], ids=["host_ids", "device_ids"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("name", list(KERNEL_CASES))
def test_kernel_paths(name, dtype, host_ids):
    size, r, E, routing, gate, p, trainable = KERNEL_CASES[name]
    compare(make_case(size, r, E, routing, gate, p, seed=7), dtype, trainable, f"{name}: ", host_ids=host_ids)


@gpu_test
@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("name", ["r33_tiles", "decode_16", "skewed_frozen"])
def test_forced_splits(name, splits, monkeypatch):
    """Both the direct (1 split) and the partials + fixed-order reduction paths of every kernel."""
    monkeypatch.setattr(cuda_mod, "_splits", lambda blocks, length, min_len, sms: splits)
    size, r, E, routing, gate, p, trainable = KERNEL_CASES[name]
    for dtype in (torch.float32, torch.bfloat16):
        compare(make_case(size, r, E, routing, gate, p, seed=8), dtype, trainable, f"{name} splits={splits}: ",
                host_ids=False)


@gpu_test
def test_no_bias_and_strided_layouts():
    """Column-major / transposed weights and a padded x row stride: the kernels take strides."""
    views = {
        "x": lambda t: torch.cat([t, t], dim=1)[:, : t.shape[1]],  # row stride 2 * d_in
        "shared_A": lambda t: t.t().contiguous().t(),
        "shared_B": lambda t: t.t().contiguous().t(),
        "task_A": lambda t: t.transpose(1, 2).contiguous().transpose(1, 2),
        "task_B": lambda t: t.transpose(1, 2).contiguous().transpose(1, 2),
    }
    case = make_case((45, 70, 38), 6, 3, "partial", True, 0.1, seed=9, bias=False)
    for dtype in DTYPES:
        compare(case, dtype, what="strided: ", views=views)


@gpu_test
def test_backward_accepts_eager_forward_outputs():
    """base.py: any backend's backward consumes any backend's (y, h_s, h_t, coef)."""
    inp, tt, gy, E, p = make_case((37, 29, 23), 5, 3, "partial", True, 0.1)
    t = {k: (v.detach().to(DEVICE, torch.float32) if v is not None else None) for k, v in inp.items()}
    rt = build_routing(tt, E, tt.shape[0], device=DEVICE)
    seed = torch.tensor(DROP_SEED)
    routing_args = (rt.token_task, rt.sorted_idx, rt.expert_offsets, rt.offsets_cpu, rt.single_task)
    params = [t[k] for k in ("x", "weight", "bias", "shared_A", "shared_B", "task_A", "task_B", "gate_weight")]
    grads = {}
    for fwd_backend in ("eager", "cuda"):
        _, h_s, h_t, coef = moe_lora_fwd(*params, *routing_args, SCALE, p, seed, *[None] * len(SNAPSHOT_FIELDS), [],
                                         False, fwd_backend)
        grads[fwd_backend] = moe_lora_bwd(*call_args(
            BWD_SCHEMA_ARGS, grad_y=gy.to(DEVICE, torch.float32), **t, token_task=rt.token_task,
            sorted_idx=rt.sorted_idx, expert_offsets=rt.expert_offsets, offsets_cpu=rt.offsets_cpu,
            single_task=rt.single_task, h_s=h_s, h_t=h_t, coef=coef, scale=SCALE, dropout_p=p, seed=seed,
            needs_dx=True, needs_shared=True, needs_task=True, needs_gate=True, expert_trainable=[],
            deterministic=False, backend="cuda"))
    for a, b in zip(grads["eager"], grads["cuda"]):
        assert max_rel_err(a, b.double()) <= 1e-5


@gpu_test
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_bitwise_deterministic(dtype):
    size, r, E, routing, gate, p, trainable = KERNEL_CASES["skewed_frozen"]
    case = make_case(size, r, E, routing, gate, p, seed=10)
    a = run_backend(case, dtype, "cuda", trainable=trainable, deterministic=True)
    b = run_backend(case, dtype, "cuda", trainable=trainable, deterministic=True)
    for k in a:
        assert torch.equal(a[k], b[k]), k


@gpu_test
def test_frozen_gate_still_backpropagates_into_x():
    """dx includes the gate path even when W_g itself needs no gradient."""
    inp, tt, gy, E, p = make_case((37, 29, 23), 5, 3, "partial", True, 0.1, seed=11)
    t = {k: (v.detach().to(DEVICE, torch.float32) if v is not None else None) for k, v in inp.items()}
    t["x"].requires_grad_(True)
    routing = build_routing(tt, E, tt.shape[0], device=DEVICE)
    y = moe_lora_linear(**t, routing=routing, scale=SCALE, dropout_p=p, seed=torch.tensor(DROP_SEED), backend="cuda")
    (dx,) = torch.autograd.grad(y, [t["x"]], gy.to(DEVICE, torch.float32))
    ref = run_reference((inp, tt, gy, E, p), torch.float32)
    assert max_rel_err(dx, ref["x"]) <= 1e-5


@gpu_test
def test_rank_above_kernel_limit_falls_back_and_says_so():
    inp, tt, _, E, _ = make_case((4, 8, 6), 129, 1, "single", False, 0.0)
    t = {k: (v.detach().to(DEVICE, torch.float32) if v is not None else None) for k, v in inp.items()}
    routing = build_routing(tt, E, 4, device=DEVICE)
    with pytest.warns(RuntimeWarning, match=r"r=129 is above the cuda kernels' limit of 128.*falling back"):
        y = moe_lora_linear(**t, routing=routing, scale=1.0, backend="cuda")
    ref = moe_lora_linear(**t, routing=routing, scale=1.0, backend="eager")
    torch.testing.assert_close(y, ref)


def _capture(fn):
    """(graph, outputs) of ``fn`` captured into a CUDA graph after a warm-up outside capture."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


@gpu_test
def test_forward_in_cuda_graph():
    """No host syncs: the forward captures into a CUDA graph and replays to the same result."""
    inp, tt, _, E, _ = make_case((16, 512, 320), 16, 8, "partial", True, 0.0)
    t = {k: (v.detach().to(DEVICE, torch.bfloat16) if v is not None else None) for k, v in inp.items()}
    routing = build_routing(tt.to(DEVICE), E, tt.shape[0], device=DEVICE)
    assert routing.single_task == SINGLE_MIXED and routing.offsets_cpu is None

    def fwd():
        return moe_lora_linear(**t, routing=routing, scale=SCALE, backend="cuda")

    expected = fwd()
    graph, out = _capture(fwd)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, expected)


@gpu_test
def test_graph_replay_with_a_new_seed():
    """Forward + backward captured in a CUDA graph, replayed after the seed tensor (on the device)
    is refilled in place: the kernels read the seed there, so the replay uses the new mask."""
    case = make_case((64, 96, 80), 8, 4, "partial", True, 0.2, seed=12)
    inp, tt, gy, E, p = case
    t = {k: (v.detach().to(DEVICE, torch.bfloat16).requires_grad_(v.requires_grad) if v is not None else None)
         for k, v in inp.items()}
    routing = build_routing(tt.to(DEVICE), E, tt.shape[0], device=DEVICE)
    seed = torch.tensor(DROP_SEED, device=DEVICE)
    gy_d = gy.to(DEVICE, torch.bfloat16)
    names = [n for n in GRAD_NAMES if t[n] is not None]

    def step():
        y = moe_lora_linear(**t, routing=routing, scale=SCALE, dropout_p=p, seed=seed, backend="cuda")
        return (y.detach(), *torch.autograd.grad(y, [t[n] for n in names], gy_d))

    graph, outs = _capture(step)
    new_seed = 4321
    seed.fill_(new_seed)
    graph.replay()
    torch.cuda.synchronize()
    got = dict(zip(["y", *names], outs))
    check(got, run_backend(case, torch.bfloat16, "eager", drop_seed=new_seed),
          run_reference(case, torch.bfloat16, drop_seed=new_seed), torch.bfloat16, "replayed with a new seed: ")

"""Issue 25's kernel changes, on the CPU: the extra tiles timed as providers of their own
(``variants.TILE_PROVIDERS``: a 2-CTA/SM ``gemm-tma`` tile, a one-wave decode tile), ``NUM_PROGS``
of the persistent TMA GEMM as a runtime argument, and the decode GEMV's split planning.

The kernels run under the Triton interpreter against the float64 reference (``backend_harness``:
fresh inputs, outputs poisoned before the kernels write them)."""

from __future__ import annotations

import inspect
import warnings

import pytest

pytest.importorskip("triton")
import torch  # noqa: E402
from backend_harness import Case, check, make_inputs, reference, run  # noqa: E402
from test_triton_backend import needs_interpreter  # noqa: E402

from moecl_kernels.backends.eager import EagerBackend  # noqa: E402
from moecl_kernels.backends.triton import TritonBackend  # noqa: E402
from moecl_kernels.backends.triton import fused_gemm as G  # noqa: E402
from moecl_kernels.backends.triton import variants as V  # noqa: E402

pytestmark = pytest.mark.usefixtures("poison_uninitialized_memory")  # tests/conftest.py
DTYPES = [torch.float32, torch.float16]


def provider_backend(name: str, decode_t: int) -> TritonBackend:
    variant, tiles = V.TILE_PROVIDERS[name]
    b = TritonBackend(variant=variant, tiles=dict(tiles))
    b._gemm.decode_t = decode_t
    return b


def assert_matches(b: TritonBackend, case: Case, dtype) -> None:
    inp = make_inputs(case, dtype)
    ref, eager = reference(inp), run(EagerBackend(), inp)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        got = run(b, inp)
    check(got, eager, ref, dtype, what=f"{b.variant} {case}: ")


@needs_interpreter
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_tma_2cta_tile(dtype):
    """The 2-CTA/SM tile's forward and dgrad GEMMs (TMA, rows 16-byte aligned) -- more than one
    row and column tile, so the persistent loop walks several tiles per program."""
    b = provider_backend("gemm-tma-2cta", decode_t=0)
    assert b._gemm.tiles["g_tma"].block_n == 128
    assert_matches(b, Case(T=136, d_in=32, d_out=136, r=8, E=3, routing="mixed"), dtype)


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.float32, pytest.param(torch.float16, marks=pytest.mark.slow)], ids=str)
def test_one_wave_decode_tile(dtype, monkeypatch):
    """The one-wave decode tile, its split-K planned as on a GPU (``sms_of`` patched to 16 SMs): several
    K splits, at most one program per SM."""
    grids = []
    real = V.D._decode_gemv_kernel

    class Spy:
        def __getitem__(self, grid):
            grids.append(grid)
            return real[grid]

    monkeypatch.setattr(V, "sms_of", lambda t: 16)
    monkeypatch.setattr(V.D, "_decode_gemv_kernel", Spy())
    b = provider_backend("gemm-decode-1wave", decode_t=64)
    assert_matches(b, Case(T=12, d_in=520, d_out=40, r=8, E=3, routing="mixed"), dtype)
    cols, splits = grids[0]
    assert splits >= 2 and cols * splits <= 16, grids


def test_decode_split_planning():
    """Two waves (the table): rounded down to a power of 2; one wave: never over one program per SM."""
    # docs/spec.md §4 decode on an H100: d = 4096, BN = BK = 128, E = 8 -> 32 + 1 + 8 column blocks
    assert V.decode_splits(132, 41, 4096, 128, waves=2) == 4  # 164 programs: two waves at 1 CTA/SM
    assert V.decode_splits(132, 41, 4096, 128, waves=1) == 3  # 123 programs: one wave
    for sms in (1, 7, 108, 132):
        for cols in (1, 5, 41, 200):
            s = V.decode_splits(sms, cols, 4096, 128, waves=1)
            assert s >= 1 and (cols * s <= sms or s == 1)
    assert V.decode_splits(132, 3, 512, 128, waves=1) == 2  # >= 2 K tiles per split


def test_num_progs_is_a_runtime_argument():
    """One binary serves every grid: NUM_PROGS is neither a constexpr nor specialised."""
    fn = G._gemm_tma_kernel
    fn = getattr(fn, "fn", fn)  # the interpreter wraps the JIT function
    params = inspect.signature(fn).parameters
    assert "NUM_PROGS" in params and params["NUM_PROGS"].annotation in (inspect.Parameter.empty, "")
    src = inspect.getsource(G)  # the interpreter drops the JIT's options: read the decorator
    deco = src[:src.index("def _gemm_tma_kernel(")].rsplit("@triton.jit", 1)[1]
    assert '"NUM_PROGS"' in deco.split("do_not_specialize=", 1)[1].split("]", 1)[0]


def test_tile_providers_are_benchmark_providers():
    from benchmarks.providers import TILE_PROVIDER_NAMES, TRITON_PROVIDERS

    for n in TILE_PROVIDER_NAMES:
        assert TRITON_PROVIDERS[n] in V.TILE_PROVIDERS


# ---------------------------------------------------------------------------------------------
# the FFN weight-gradient kernel split over token chunks (fixed-order fp32 slots + one reduce launch)


@needs_interpreter
@pytest.mark.parametrize("routing,dtype", [("skewed", torch.float32), ("skewed", torch.float16),
                                           ("single", torch.float32),
                                           pytest.param("single", torch.float16, marks=pytest.mark.slow)],
                         ids=str)
def test_ffn_wgrad_split_over_token_chunks(dtype, routing, monkeypatch):
    """One token block per chunk: chunks that start and end inside an expert's group, chunks that
    hold several experts, frozen experts (zeros) and experts without tokens, against float64."""
    from test_ffn_triton import Case as FfnCase, check as ffn_check, make_args, run as ffn_run, to64

    from moecl_kernels.backends.triton import ffn as FF

    monkeypatch.setenv(FF.WGRAD_CHUNK_ENV, "16")
    c = FfnCase(T=56, d=13, d_ff=37, r=5, E=5, routing=routing)  # 4 chunks of 16 tokens
    fa, bwd = make_args(c, dtype, trainable=[True, False, True, True, True])
    ref = ffn_run("reference", to64(fa), bwd, torch.float64)
    eager = ffn_run(EagerBackend(), fa, bwd, dtype)
    got = ffn_run(TritonBackend(), fa, bwd, dtype)
    ffn_check(got, eager, ref, dtype, what=f"{routing} {dtype}: ")
    for n in ("gate_proj_task_B", "up_proj_task_B", "down_proj_task_A"):
        assert got[n][1].abs().max() == 0, n  # the frozen expert
    again = ffn_run(TritonBackend(), fa, bwd, dtype)  # slots added in a fixed order: bit-identical
    for n in ("up_proj_shared_B", "down_proj_shared_A", "gate_proj_task_B", "down_proj_task_A"):
        assert torch.equal(got[n], again[n]), n


def test_ffn_wgrad_chunk_planning(monkeypatch):
    from moecl_kernels.backends.triton import configs
    from moecl_kernels.backends.triton import ffn as FF

    monkeypatch.setattr(configs, "sm_count", lambda device: 132)
    cuda = torch.device("cuda")
    # issue 12's row: T = 8192, d_ff = 11008 in 64-wide blocks (172): 4 chunks of 2048 tokens, 688 programs
    assert FF.wgrad_chunk(8192, 172, 32, cuda) == 2048
    assert FF.wgrad_chunk(16, 172, 32, cuda) == 32  # decode: one chunk
    for T in (1, 31, 33, 1000, 8191, 65536):
        ch = FF.wgrad_chunk(T, 172, 32, cuda)
        assert ch % 32 == 0 and 1 <= -(-T // ch) <= max(1, -(-4 * 132 // 172))
    assert FF.wgrad_chunk(70, 3, 16, torch.device("cpu")) == 32  # the interpreter: two token blocks

"""Tile configurations of the Triton kernels: tables per GPU architecture and shape bucket,
and an opt-in, cached autotuner.

Lookup: ``TileTable.get(kernel, device, T, r)`` with ``kernel`` one of ``shrink``,
``expand`` (LoRA expand, base GEMM by cuBLAS), ``fused`` (expand with the base GEMM inside
the kernel) and ``wgrad``. Buckets are the token count (``decode``: T <= 64, ``small``:
T <= 1024, ``large``) and the padded rank (``lo``: r <= 32, ``hi``: r up to 128, smaller
token tiles so the fp32 accumulators fit in registers).

Tables exist for sm_90 (H100/H200) and sm_80 (A100). Fallback, documented: any other
CUDA architecture uses the sm_80 table with ``num_stages`` capped at 2 (consumer and
sm_12x parts have ~100 KB of shared memory per block, less than sm_80's 164 KB); the
Triton interpreter (CPU) uses small tiles, which keep interpretation fast and exercise
the masking and multi-block paths. The tables are starting points chosen from the
kernels' register/shared-memory footprint, not measurements: the GPU benchmark run is
what should settle them (or autotuning).

Autotuning is never on by surprise: only with ``MOECL_TRITON_AUTOTUNE=1``, on CUDA, and
never while a CUDA graph is being captured. Each (kernel, arch, dtype, shape) key is tuned
once over the bucket's candidates; results persist in
``$MOECL_TRITON_CACHE_DIR/autotune.json`` (default ``~/.cache/moecl_kernels``).
Tune before capturing graphs or compiling; a cached result is a dictionary lookup.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import threading
from dataclasses import dataclass
from typing import Callable, Optional

import torch

AUTOTUNE_ENV = "MOECL_TRITON_AUTOTUNE"
CACHE_DIR_ENV = "MOECL_TRITON_CACHE_DIR"
KERNELS = ("shrink", "expand", "fused", "wgrad")


@dataclass(frozen=True)
class Tile:
    """One launch configuration. Each kernel reads the fields it uses:

    shrink: block_t, block_k, split_k (0 = split K until the SMs are busy: the decode path)
    expand: block_t, block_n, group;  fused: block_t, block_n, block_k, group
    wgrad:  chunk (tokens per program), block_t (tokens per step), block_n
    g_decode (variants.py): split_k 0 plans the split-K grid for ``waves`` programs per SM on a GPU
    """

    block_t: int = 64
    block_n: int = 64
    block_k: int = 64
    split_k: int = 1
    chunk: int = 256
    group: int = 8
    num_warps: int = 4
    num_stages: int = 2
    waves: int = 2


DECODE_T = 64  # token counts up to this take the decode path (split-K shrink, cuBLAS base GEMM)


def _bucket(T: int, r: int) -> tuple[str, str]:
    t = "decode" if T <= DECODE_T else "small" if T <= 1024 else "large"
    return t, "lo" if r <= 32 else "hi"


def _table(decode: dict, small: dict, large: dict, hi: dict) -> dict:
    """Per kernel: {(T bucket, rank bucket): Tile}; ``hi`` overrides fields for r > 32."""
    out = {}
    for k in KERNELS:
        for tb, src in (("decode", decode), ("small", small), ("large", large)):
            base = src[k]
            out[(k, tb, "lo")] = base
            out[(k, tb, "hi")] = dataclasses.replace(base, **hi.get(k, {}))
    return out


T = Tile
_SM90 = _table(
    decode=dict(shrink=T(block_t=16, block_k=128, split_k=0, num_stages=3),
                expand=T(block_t=16, block_n=128),
                fused=T(block_t=16, block_n=64, block_k=128, num_stages=4),
                wgrad=T(chunk=64, block_t=16, block_n=128)),
    small=dict(shrink=T(block_t=64, block_k=128, split_k=0, num_stages=3),
               expand=T(block_t=64, block_n=128),
               fused=T(block_t=64, block_n=128, block_k=64, num_warps=4, num_stages=4),
               wgrad=T(chunk=256, block_t=64, block_n=128, num_stages=3)),
    large=dict(shrink=T(block_t=64, block_k=128, split_k=0, num_stages=3),
               expand=T(block_t=64, block_n=128),
               fused=T(block_t=128, block_n=128, block_k=64, num_warps=8, num_stages=3),  # 256 wide spill
               wgrad=T(chunk=512, block_t=64, block_n=128, num_warps=8, num_stages=3)),  # 4 warps spill
    hi=dict(shrink=dict(block_k=64, num_warps=8), wgrad=dict(block_n=64, num_warps=8),
            fused=dict(block_t=64, block_n=128)),
)
_SM80 = _table(
    decode=dict(shrink=T(block_t=16, block_k=128, split_k=0, num_stages=3),
                expand=T(block_t=16, block_n=128),
                fused=T(block_t=16, block_n=64, block_k=128, num_stages=3),
                wgrad=T(chunk=64, block_t=16, block_n=128)),
    small=dict(shrink=T(block_t=64, block_k=64, split_k=0, num_stages=3),
               expand=T(block_t=64, block_n=128),
               fused=T(block_t=64, block_n=128, block_k=32, num_warps=4, num_stages=4),
               wgrad=T(chunk=256, block_t=32, block_n=128, num_stages=3)),
    large=dict(shrink=T(block_t=64, block_k=64, split_k=0, num_stages=3),
               expand=T(block_t=64, block_n=128, num_warps=8),  # 4 warps spill on sm_80
               fused=T(block_t=128, block_n=128, block_k=32, num_warps=8, num_stages=4),
               wgrad=T(chunk=512, block_t=32, block_n=128, num_stages=3)),
    hi=dict(shrink=dict(block_k=32, num_warps=8), wgrad=dict(block_n=64, num_warps=8),
            fused=dict(block_t=64)),
)
_INTERPRETER = {
    (k, tb, rb): T(block_t=16, block_n=16, block_k=16, split_k=1, chunk=32, group=2)
    for k in KERNELS for tb in ("decode", "small", "large") for rb in ("lo", "hi")
}
del T

# Autotuning candidates: the table entry plus these variations (fields a kernel ignores
# are left as in the table entry).
_CANDIDATES = {
    "shrink": [dict(block_t=32), dict(block_t=64), dict(block_t=128, block_k=64), dict(num_warps=8)],
    "expand": [dict(block_n=64), dict(block_n=256, num_warps=8), dict(block_t=128)],
    "fused": [dict(block_t=128, block_n=128, num_warps=8), dict(block_t=64, block_n=256, num_warps=8),
              dict(block_t=128, block_n=256, num_stages=4, num_warps=8), dict(block_t=64, block_n=64)],
    "wgrad": [dict(chunk=256), dict(chunk=1024), dict(block_n=64), dict(block_t=32)],
}


_DEVICE_INFO: dict = {}


def _device_info(device: torch.device) -> tuple[str, int]:
    """(``sm_XY``, SM count) of a CUDA device, looked up once per device."""
    idx = device.index if device.index is not None else torch.cuda.current_device()
    info = _DEVICE_INFO.get(idx)
    if info is None:
        p = torch.cuda.get_device_properties(idx)
        info = _DEVICE_INFO[idx] = (f"sm_{p.major}{p.minor}", p.multi_processor_count)
    return info


def arch_of(device: torch.device) -> str:
    """``sm_XY`` for CUDA devices, ``interpreter`` for CPU (TRITON_INTERPRET=1)."""
    return _device_info(device)[0] if device.type == "cuda" else "interpreter"


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device."""
    return _device_info(device)[1]


def table_for(arch: str) -> dict:
    if arch == "interpreter":
        return _INTERPRETER
    if arch == "sm_90":
        return _SM90
    if arch == "sm_80":
        return _SM80
    return {k: dataclasses.replace(v, num_stages=min(v.num_stages, 2)) for k, v in _SM80.items()}


def _cache_path() -> str:
    root = os.environ.get(CACHE_DIR_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "moecl_kernels")
    return os.path.join(root, "autotune.json")


def _bench_cuda(fn: Callable[[], object]) -> float:
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=5, rep=20))


class TileTable:
    """Configuration lookup with optional fixed overrides (tests, experiments) and autotuning.

    ``overrides`` maps a kernel name to the Tile used for every shape. ``bench`` times one
    callable in ms (tests replace it; default ``triton.testing.do_bench``)."""

    def __init__(self, overrides: Optional[dict[str, Tile]] = None, bench: Callable = _bench_cuda):
        unknown = set(overrides or ()) - set(KERNELS)
        if unknown:
            raise ValueError(f"unknown kernel(s) in tile overrides: {sorted(unknown)}; known: {KERNELS}")
        self.overrides = dict(overrides or {})
        self.bench = bench
        self._tuned: Optional[dict[str, dict]] = None
        self._lock = threading.Lock()

    def get(self, kernel: str, device: torch.device, T: int, r: int) -> Tile:
        if kernel in self.overrides:
            return self.overrides[kernel]
        return table_for(arch_of(device))[(kernel, *_bucket(T, r))]

    @staticmethod
    def autotune_enabled(device: torch.device) -> bool:
        if device.type != "cuda" or os.environ.get(AUTOTUNE_ENV, "0") != "1":
            return False
        return not torch.cuda.is_current_stream_capturing() and not torch.compiler.is_compiling()

    def pick(self, kernel: str, device: torch.device, T: int, r: int, key: tuple,
             run: Callable[[Tile], object]) -> Tile:
        """The tile for this call: the table's (or override's), or, with autotuning on, the
        fastest candidate for ``key`` (``run(tile)`` launches the stage; it must be
        repeatable). Tuning happens once per key and is persisted."""
        default = self.get(kernel, device, T, r)
        if kernel in self.overrides or not self.autotune_enabled(device):
            return default
        name = "|".join([kernel, arch_of(device), *map(str, key)])
        with self._lock:
            tuned = self._load()
            if name not in tuned:
                cands = [default] + [dataclasses.replace(default, **c) for c in _CANDIDATES[kernel]]
                times = []
                for c in dict.fromkeys(cands):  # dedupe, keep order
                    try:
                        times.append((self.bench(lambda c=c: run(c)), c))
                    except Exception:  # a candidate that cannot compile/launch here (smem, ...)
                        continue
                best = min(times, key=lambda tc: tc[0])[1] if times else default
                tuned[name] = dataclasses.asdict(best)
                self._save(tuned)
            return Tile(**tuned[name])

    def _load(self) -> dict:
        if self._tuned is None:
            try:
                with open(_cache_path()) as f:
                    self._tuned = json.load(f)
            except (OSError, ValueError):
                self._tuned = {}
        return self._tuned

    def _save(self, tuned: dict) -> None:
        path = _cache_path()
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".tmp")
            with os.fdopen(fd, "w") as f:
                json.dump(tuned, f, indent=1, sort_keys=True)
            os.replace(tmp, path)
        except OSError:  # a read-only home must not break training; results stay in memory
            pass

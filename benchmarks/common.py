"""Machinery shared by the benchmarks: environment record, timing, memory, checks, tables.

Timing: CUDA events around every repetition on a GPU (the interval includes any host
launch overhead the provider has, as a user would see it: back to back, a launch-bound step
measures the host's speed, a one-kernel step the device's); ``time.perf_counter`` on the
CPU. Each measurement warms up, sizes its repetition count to a time target, and keeps
every repetition's time; the median is the reported figure. Callers rotate among several
input sets (``step(i)`` uses set ``i % n_rot``) so repeated runs do not hit a warm L2, and
``Timer.interleaved`` times several steps round-robin so that none always goes first.

Memory: on a GPU, the peak allocated above what was allocated before one step
(outputs, saved activations, gradients and workspaces); on the CPU no allocator
statistics exist and peak memory is reported as n/a. Saved activations are counted on
any device with autograd's saved-tensor hooks.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import math
import os
import platform
import signal
import statistics
import subprocess
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence

import torch
from torch import Tensor

REPO_ROOT = Path(__file__).resolve().parent.parent

# Largest accepted max|got - ref| / max|ref| per activation dtype (ref: float64). The fp32
# bound admits TF32 matrix units; bf16 admits bf16 operands with fp32 accumulation.
TOLERANCE = {torch.float64: 1e-9, torch.float32: 5e-3, torch.float16: 1e-2, torch.bfloat16: 3e-2}

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


# --------------------------------------------------------------------------------------------
# environment


def git_commit() -> str:
    """``$MOECL_GIT_COMMIT`` if set (machines without the .git folder), else HEAD (+ '-dirty')."""
    env = os.environ.get("MOECL_GIT_COMMIT", "").strip()
    if env:
        return env
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
        return head + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def git_dirty() -> Optional[str]:
    """``$MOECL_GIT_DIRTY`` if set (the hash of uncommitted changes, or ``clean``), else computed here."""
    env = os.environ.get("MOECL_GIT_DIRTY", "").strip()
    if env:
        return env
    try:
        out = subprocess.run(["bash", str(REPO_ROOT / "benchmarks" / "run_gpu.sh"), "--stamp"], cwd=REPO_ROOT,
                             capture_output=True, text=True, timeout=30, check=True).stdout
        return dict(ln.split("=", 1) for ln in out.split() if "=" in ln).get("MOECL_GIT_DIRTY")
    except (OSError, subprocess.SubprocessError):
        return None


@contextlib.contextmanager
def poisoned(quiet: bool = True):
    """Every uninitialised allocation (``torch.empty`` and the caching allocator's reused blocks) is
    filled with NaN (integers: their maximum) while the block runs, so a provider that leaves part of
    its output unwritten cannot pass its check on what the previous provider left in that memory."""
    prev = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
            torch.utils.deterministic.fill_uninitialized_memory)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        with warnings.catch_warnings() if quiet else contextlib.nullcontext():
            if quiet:  # "... does not have a deterministic implementation"
                warnings.simplefilter("ignore", UserWarning)
            yield
    finally:
        torch.use_deterministic_algorithms(prev[0], warn_only=prev[1])
        torch.utils.deterministic.fill_uninitialized_memory = prev[2]


class RowTimeout(BaseException):
    """A benchmark row ran past its own time budget (a BaseException: a provider's ``except Exception``
    does not swallow it)."""


@contextlib.contextmanager
def row_budget(seconds: Optional[float]):
    """Raise ``RowTimeout`` in the main thread once ``seconds`` have passed (no limit when None or 0).
    A GPU synchronisation in progress finishes first; the rows written before stay written."""
    if not seconds or not hasattr(signal, "setitimer"):
        yield
        return

    def _raise(signum, frame):
        if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
            signal.setitimer(signal.ITIMER_REAL, 0.2)  # never inside a CUDA-graph capture: a moment later
            return
        raise RowTimeout(f"over its budget of {seconds:g} s")

    prev = signal.signal(signal.SIGALRM, _raise)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, prev)


def _version(module: str) -> Optional[str]:
    try:
        return __import__(module).__version__
    except Exception:  # not installed, or broken: record as absent
        return None


def environment(device: torch.device) -> dict:
    """Device, library versions, commit and timer of this run (goes into every JSON)."""
    env = {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "git_commit": git_commit(),
        "git_dirty": git_dirty(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": _version("triton"),
        "peft": _version("peft"),
        "transformers": _version("transformers"),
        "device_type": device.type,
    }
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        env.update(device=p.name, capability=f"{p.major}.{p.minor}", sm_count=p.multi_processor_count,
                   memory_gib=round(p.total_memory / 2**30, 1), l2_bytes=l2_bytes(device),
                   timer="CUDA events", peak_memory="torch.cuda.max_memory_allocated above the pre-step level")
    else:
        env.update(device=f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)",
                   timer="CPU wall clock (time.perf_counter)", peak_memory="n/a on CPU (no allocator statistics)")
    return env


def l2_bytes(device: torch.device) -> int:
    """The GPU's L2 size (50 MB on an H100), or 32 MiB as a stand-in for a CPU's last-level cache."""
    if device.type == "cuda":
        return int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 * 2**20))
    return 32 * 2**20


def device_ceilings(device: torch.device, timer: Timer) -> dict:
    """Measured ceilings to read GB/s and TFLOP/s against: a large device-to-device copy
    (bytes read + written) and a bf16 8192^3 matrix product. GPU only (empty on CPU)."""
    if device.type != "cuda":
        return {}
    n, m = 256 * 2**20, 8192  # 512 MiB bf16 buffers; an m^3 bf16 product

    def measure() -> tuple[float, float]:
        src = [torch.randn(n, device=device, dtype=torch.bfloat16) for _ in range(2)]
        dst = torch.empty_like(src[0])
        t_copy = statistics.median(timer(lambda i: dst.copy_(src[i % 2]), n_rot=2))
        a = [torch.randn(m, m, device=device, dtype=torch.bfloat16) for _ in range(2)]
        b = torch.randn(m, m, device=device, dtype=torch.bfloat16)
        return t_copy, statistics.median(timer(lambda i: a[i % 2] @ b, n_rot=2))

    t_copy, t_mm = measure()
    torch.cuda.empty_cache()
    return {"copy_GBps": round(2 * n * 2 / t_copy / 1e6, 1), "bf16_matmul_TFLOPs": round(2 * m**3 / t_mm / 1e9, 1)}


# --------------------------------------------------------------------------------------------
# timing and memory


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Timer:
    """``timer(step, n_rot)`` -> per-repetition milliseconds.

    ``step(i)`` runs the measured work once on input set ``i % n_rot``. Warm-up runs
    first, then a short estimate sizes the repetition count to about ``target_ms`` of
    timed work, clamped to [min_reps, max_reps].
    """

    def __init__(self, device: torch.device, *, target_ms: float, min_reps: int, max_reps: int, warmup: int = 3):
        self.device, self.target_ms, self.min_reps, self.max_reps, self.warmup = (
            device, target_ms, min_reps, max_reps, warmup)

    def _elapsed_ms(self, step: Callable[[int], Any], start: int, n: int, n_rot: int) -> float:
        if self.device.type == "cuda":
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            e0.record()
            for i in range(start, start + n):
                step(i % n_rot)
            e1.record()
            e1.synchronize()
            return e0.elapsed_time(e1)
        t0 = time.perf_counter()
        for i in range(start, start + n):
            step(i % n_rot)
        return (time.perf_counter() - t0) * 1e3

    def __call__(self, step: Callable[[int], Any], n_rot: int) -> list[float]:
        for i in range(self.warmup):
            step(i % n_rot)
        sync(self.device)
        probe = max(1, min(3, self.min_reps))
        est = self._elapsed_ms(step, 0, probe, n_rot) / probe
        reps = int(min(self.max_reps, max(self.min_reps, math.ceil(self.target_ms / max(est, 1e-4)))))
        if self.device.type == "cuda":
            ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
            for i, (e0, e1) in enumerate(ev):
                e0.record()
                step(i % n_rot)
                e1.record()
            torch.cuda.synchronize(self.device)
            return [e0.elapsed_time(e1) for e0, e1 in ev]
        out = []
        for i in range(reps):
            t0 = time.perf_counter()
            step(i % n_rot)
            out.append((time.perf_counter() - t0) * 1e3)
        return out


    def interleaved(self, steps: dict[str, Callable[[int], Any]], n_rot: int) -> dict[str, list[float]]:
        """Per-repetition milliseconds of several steps timed together, round-robin: each round
        runs every step once, in the given order on even rounds and reversed on odd ones, so no
        step always runs first (after a sync, on a cold L2, on a warmer or cooler chip) and a
        drift of the machine during the measurement reaches them all alike. Every step gets the
        same repetition count, sized so the whole takes about ``target_ms`` per step."""
        names = list(steps)
        if not names:
            return {}
        for i in range(self.warmup):
            for n in names:
                steps[n](i % n_rot)
        sync(self.device)
        probe = max(1, min(3, self.min_reps))
        est = sum(self._elapsed_ms(steps[n], 0, probe, n_rot) / probe for n in names)
        reps = int(min(self.max_reps, max(self.min_reps, math.ceil(self.target_ms * len(names) / max(est, 1e-4)))))
        times: dict[str, list[float]] = {n: [] for n in names}
        order = [(i, n) for i in range(reps) for n in (names if i % 2 == 0 else names[::-1])]
        if self.device.type == "cuda":
            ev = []
            for i, n in order:
                e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                e0.record()
                steps[n](i % n_rot)
                e1.record()
                ev.append((n, e0, e1))
            torch.cuda.synchronize(self.device)
            for n, e0, e1 in ev:
                times[n].append(e0.elapsed_time(e1))
            return times
        for i, n in order:
            t0 = time.perf_counter()
            steps[n](i % n_rot)
            times[n].append((time.perf_counter() - t0) * 1e3)
        return times


def peak_memory_mb(step: Callable[[int], Any], device: torch.device) -> Optional[float]:
    """Peak bytes allocated by one ``step(0)`` above the level before it (MiB); None on CPU."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    out = step(0)
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - before
    del out
    return peak / 2**20


def saved_activation_bytes(forward: Callable[[], Tensor], exclude: Iterable[Optional[Tensor]]) -> int:
    """Bytes of the storages autograd saves for backward during ``forward()``, counting each
    storage once and leaving out those of ``exclude`` (inputs, weights, routing tensors:
    they live anyway, whoever saves them)."""
    skip = {t.untyped_storage().data_ptr() for t in exclude if t is not None and t.numel() > 0}
    seen: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        if t.numel() > 0:
            st = t.untyped_storage()
            if st.data_ptr() not in skip:
                seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = forward()
    del y
    return sum(seen.values())


# --------------------------------------------------------------------------------------------
# correctness


def rel_err(got: Tensor, want: Tensor) -> float:
    """max|got - want| / max|want| in float64; inf for a non-finite result or a shape mismatch."""
    if tuple(got.shape) != tuple(want.shape):
        return math.inf
    g, w = got.detach().to(torch.float64), want.detach().to(device=got.device, dtype=torch.float64)
    if not bool(torch.isfinite(g).all()):
        return math.inf
    if g.numel() == 0:
        return 0.0
    return float((g - w).abs().max() / w.abs().max().clamp_min(1e-30))


# --------------------------------------------------------------------------------------------
# reporting


def md_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(" --- " for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def fmt(v: Optional[float], spec: str = ".3g", none: str = "–") -> str:
    return none if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=str))
    tmp.replace(path)

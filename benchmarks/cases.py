"""What the op microbenchmark measures: cases, routings, the docs/spec.md §4 rows and the sweeps.

A case is (mode, d_in, d_out, r, E, T, routing, dtype). Tokens come as sequences with one task
id each, as a data loader provides them (on the host):

* ``one``: every sequence the last expert; ``mixed``: uniform round-robin, shuffled;
  ``zipf``: P(task k) ~ 1/(k+1)^1.2; ``partial``: mixed with every 4th sequence without a task
  -- B = gcd(T, 64) sequences of T // B tokens each;
* ``ragged``: the realistic mixed batch -- sequences of odd lengths (never a multiple of a
  tile), zipf-skewed tasks, every 8th sequence without a task.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

MODES = ("fwd", "fwd+bwd")
ROUTINGS = ("one", "mixed", "zipf", "partial", "ragged")
MAX_SEQS = 64          # tokens are B = gcd(T, 64) sequences of T // B tokens; task ids are per sequence
NO_TASK_EVERY = 4      # "partial": every 4th sequence has no task
ZIPF_S = 1.2           # "zipf" and "ragged": P(task k) ~ 1 / (k + 1)^s
RAGGED_MEAN = 101      # "ragged": mean sequence length (odd lengths in [MEAN/2, 3 MEAN/2])
RAGGED_NO_TASK_EVERY = 8
DECODE_T = 64          # cases with T <= this (forward) are also timed as CUDA-graph replays


@dataclass(frozen=True)
class Case:
    mode: str       # "fwd" (no autograd) or "fwd+bwd" (dx and every LoRA/gate gradient; W frozen)
    d_in: int
    d_out: int
    r: int
    E: int
    T: int
    routing: str    # one | mixed | zipf | partial | ragged (see the module docstring)
    dtype: str = "bf16"

    @property
    def label(self) -> str:
        return f"{self.mode} {self.d_in}x{self.d_out} r{self.r} E{self.E} T{self.T} {self.routing} {self.dtype}"

    @property
    def decode(self) -> bool:
        """Timed eagerly and as CUDA-graph replays (decode is launch-bound eagerly)."""
        return self.mode == "fwd" and self.T <= DECODE_T


@dataclass(frozen=True)
class SpecTarget:
    key: str
    label: str
    target: str
    case: Optional[Case]
    max_ratio: Optional[float] = None


_S = dict(d_in=4096, d_out=4096, r=16, E=8)
SPEC_TARGETS = (
    SpecTarget("fwd_one", "forward, T = 8192, one task", "≤ 1.08 × base",
               Case("fwd", T=8192, routing="one", **_S), 1.08),
    SpecTarget("fwd_mixed", "forward, T = 8192, 8 tasks mixed", "≤ 1.10 × base",
               Case("fwd", T=8192, routing="mixed", **_S), 1.10),
    SpecTarget("fwd_bwd", "fwd + bwd (dx and LoRA grads), T = 8192, one task", "≤ 1.15 × base (fwd + dgrad)",
               Case("fwd+bwd", T=8192, routing="one", **_S), 1.15),
    SpecTarget("decode", "decode, T = 16, 8 tasks mixed", "≤ 1.3 × base",
               Case("fwd", T=16, routing="mixed", **_S), 1.3),
    SpecTarget("saved", "saved activations per layer (fwd + bwd case above)", "x (shared with base) + O(T·r)",
               Case("fwd+bwd", T=8192, routing="one", **_S)),
    SpecTarget("e2e", "end-to-end MoE-CL train step, Llama-style 1B, all FFN linears",
               "≥ 1.5 × eager tokens/s; ≥ 0.9 × PEFT single-LoRA", None),
)
# the library's fused backends as benchmark providers (both Triton expand modes, the CUDA kernels)
FUSED = ("triton-addmm", "triton-fused", "cuda")


def saved_bound_bytes(T: int, r: int) -> int:
    """The "O(T·r)" of docs/spec.md §4 made concrete: 16·T·(r + 2) bytes beyond x, i.e. two fp32 [T, r]
    intermediates, fp32 [T, 2] gates and int32 slack (T×d_out bf16 is 4096/(r+2)× more at d=4096)."""
    return 16 * T * (r + 2)


# --------------------------------------------------------------------------------------------
# sweeps


def _routings(E: int) -> tuple[str, ...]:
    return ("one", "partial") if E == 1 else ROUTINGS


def quick_cases() -> list[Case]:
    """Tiny fp32 CPU shapes exercising every mode, routing and provider path (d_in != d_out both ways)."""
    cases = [Case(m, 64, 96, 8, 4, T, rt, "fp32") for m in MODES for T in (1, 16, 128) for rt in ROUTINGS]
    cases += [Case(m, 96, 64, 4, 1, 32, rt, "fp32") for m in MODES for rt in _routings(1)]
    return cases


def spec_cases() -> list[Case]:
    """The first GPU call's op cases (bf16): the docs/spec.md §4 rows, the ragged mixed batch next to
    the balanced one (forward and fwd+bwd), and decode (T = 16 mixed and one task, T = 64
    ragged), the decode rows timed eagerly and as graph replays."""
    cases = [t.case for t in SPEC_TARGETS if t.case is not None]
    cases += [Case("fwd", T=8192, routing="ragged", **_S), Case("fwd+bwd", T=8192, routing="ragged", **_S),
              Case("fwd", T=16, routing="one", **_S), Case("fwd", T=64, routing="ragged", **_S)]
    return list(dict.fromkeys(cases))


def gpu_cases() -> list[Case]:
    """The curated GPU sweep (bf16, budgeted at 420 s; the optional second GPU call), around the
    SPEC shape d=4096 r=16 E=8:

    1. the docs/spec.md §4 rows and the ragged batches of ``spec_cases``;
    2. T scan 1..16384 for every routing, forward; fwd+bwd for one-task, mixed and ragged batches;
    3. d_in/d_out in {2048, 4096, 8192} (square and both non-square FFN directions) at decode
       (T=16) and prefill/training (T=4096) sizes;
    4. r in {8, 64} and E in {1, 32} at the same two sizes.
    Each axis is varied alone from the SPEC shape; ``--full`` runs the cross product.
    """
    S = _S
    cases = spec_cases()
    cases += [Case("fwd", T=T, routing=rt, **S) for T in (1, 16, 512, 4096, 16384) for rt in ROUTINGS]
    cases += [Case("fwd+bwd", T=T, routing=rt, **S) for T in (16, 512, 4096, 16384)
              for rt in ("one", "mixed", "ragged")]
    cases.append(Case("fwd+bwd", T=8192, routing="mixed", **S))
    for d_in, d_out in ((2048, 2048), (8192, 8192), (4096, 8192), (8192, 4096)):
        shape = dict(S, d_in=d_in, d_out=d_out)
        cases += [Case("fwd", T=T, routing="mixed", **shape) for T in (16, 4096)]
        cases.append(Case("fwd+bwd", T=4096, routing="one", **shape))
    for r in (8, 64):
        cases += [Case("fwd", T=T, routing="mixed", **dict(S, r=r)) for T in (16, 4096)]
        cases.append(Case("fwd+bwd", T=4096, routing="one", **dict(S, r=r)))
    cases += [Case("fwd", T=T, routing="one", **dict(S, E=1)) for T in (16, 4096)]
    cases += [Case("fwd", T=T, routing=rt, **dict(S, E=32)) for T in (16, 4096) for rt in ("mixed", "zipf")]
    cases.append(Case("fwd+bwd", T=4096, routing="mixed", **dict(S, E=32)))
    return list(dict.fromkeys(cases))


def full_cases() -> list[Case]:
    """The issue's whole cross product, SPEC rows first."""
    ds = (2048, 4096, 8192)
    cases = [t.case for t in SPEC_TARGETS if t.case is not None]
    cases += [Case(m, di, do, r, E, T, rt) for m in MODES for di in ds for do in ds for r in (8, 16, 64)
              for E in (1, 8, 32) for T in (1, 16, 512, 4096, 16384) for rt in _routings(E)]
    return list(dict.fromkeys(cases))


# --------------------------------------------------------------------------------------------
# routings


def _zipf(n: int, E: int, g: torch.Generator) -> list[int]:
    w = 1.0 / torch.arange(1, E + 1, dtype=torch.float64) ** ZIPF_S
    return torch.multinomial(w, n, replacement=True, generator=g).tolist()


def sequence_tasks(routing: str, B: int, E: int, g: torch.Generator) -> list[int]:
    """Task id (-1 = none) of each of B equal-length sequences."""
    if routing == "one":
        return [E - 1] * B  # the last expert, so a kernel that ignores routing is caught
    if routing in ("mixed", "partial"):
        t = torch.arange(B) % E
        t = t[torch.randperm(B, generator=g)]
        if routing == "partial":
            t[::NO_TASK_EVERY] = -1
        return t.tolist()
    if routing == "zipf":
        return _zipf(B, E, g)
    raise ValueError(f"unknown routing {routing!r}; choose from {ROUTINGS}")


def ragged_lengths(T: int, g: torch.Generator) -> list[int]:
    """Sequence lengths summing to T: odd (never a multiple of a tile), around RAGGED_MEAN."""
    lengths, left = [], T
    lo, hi = RAGGED_MEAN // 4, 3 * RAGGED_MEAN // 4  # lengths 2k + 1 for k in [lo, hi)
    while left > 0:
        n = 2 * int(torch.randint(lo, hi, (1,), generator=g)) + 1
        lengths.append(min(n, left))
        left -= lengths[-1]
    return lengths


def batch_tasks(routing: str, T: int, E: int, g: torch.Generator) -> tuple[list[int], object]:
    """(task id per sequence, the ids to route with: per sequence [B] or per token [T])."""
    if routing != "ragged":
        B = math.gcd(T, MAX_SEQS)
        seq = sequence_tasks(routing, B, E, g)
        return seq, torch.tensor(seq)
    lengths = ragged_lengths(T, g)
    seq = _zipf(len(lengths), E, g)
    for i in range(RAGGED_NO_TASK_EVERY - 1, len(seq), RAGGED_NO_TASK_EVERY):
        seq[i] = -1
    per_token = torch.repeat_interleave(torch.tensor(seq), torch.tensor(lengths))
    return seq, per_token

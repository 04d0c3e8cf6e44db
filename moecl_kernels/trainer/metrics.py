"""Continual-learning metrics of the accuracy matrix (docs/spec.md §6).

``R[i][j]`` is the test accuracy on task j after training tasks 0..i (0-based here;
docs/spec.md §6 writes 1-based), ``b[j]`` the untrained model's accuracy on task j:

    ACC = mean_j R[T-1][j]
    BWT = mean_{i < T-1} (R[T-1][i] - R[i][i])     (forgetting: negative)
    LA  = mean_i R[i][i]                             (learning accuracy: each task right after it)
    FWT = mean_{i >= 1} (P[i] - P0[i])              with linear probes (probe.py): P[i] on the
                                                     backbone before task i, P0[i] on the untrained one
        = mean_{i >= 1} (R[i-1][i] - b[i])          without probes (generative mode: zero-shot answers)
    transfer gain = mean_i (R[i][i] - R_iso[i][i])   against isolated per-task LoRA of the same run
    transfer_gain_rm                                 the same against the rank-matched isolated LoRA
                                                     (rank 2r: MoE-CL's shared + task expert per task)

BWT and FWT are None for a single task; the transfer gains are None (absent)
without their reference run.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

REFERENCE_METHOD = "isolated_lora"  # the transfer gain's reference
RANK_MATCHED_METHOD = "isolated_lora_rm"  # transfer_gain_rm's: isolated LoRA of MoE-CL's trainable size per task


def cl_metrics(R: Sequence[Sequence[float]], baseline: Sequence[float], probe: Optional[Sequence[Optional[float]]] = None,
               probe_baseline: Optional[Sequence[float]] = None) -> dict[str, Optional[float]]:
    """ACC, BWT, FWT (from probes when ``probe``/``probe_baseline`` are given: ``probe[i]`` for
    i >= 1, ``probe[0]`` unused) and LA; ``transfer_gain`` is None (see :func:`add_transfer_gain`)."""
    T = len(R)
    if T == 0 or any(len(row) != T for row in R) or len(baseline) != T:
        raise ValueError(f"R must be a square T x T matrix and baseline length T; got {T} rows and {len(baseline)} baselines")
    last = R[T - 1]
    acc = sum(last) / T
    bwt = sum(last[i] - R[i][i] for i in range(T - 1)) / (T - 1) if T > 1 else None
    if probe is not None and probe_baseline is not None:
        if len(probe) != T or len(probe_baseline) != T or any(probe[i] is None for i in range(1, T)):
            raise ValueError(f"probe and probe_baseline must hold T={T} accuracies (probe[i] for every i >= 1)")
        fwt = sum(probe[i] - probe_baseline[i] for i in range(1, T)) / (T - 1) if T > 1 else None
    else:
        fwt = sum(R[i - 1][i] - baseline[i] for i in range(1, T)) / (T - 1) if T > 1 else None
    la = sum(R[i][i] for i in range(T)) / T
    return {"ACC": acc, "BWT": bwt, "FWT": fwt, "LA": la, "transfer_gain": None}


def transfer_gain(R: Sequence[Sequence[float]], R_ref: Sequence[Sequence[float]]) -> float:
    """mean_i (R[i][i] - R_ref[i][i])."""
    if len(R) != len(R_ref):
        raise ValueError(f"the accuracy matrices differ in size: {len(R)} and {len(R_ref)} tasks")
    return sum(R[i][i] - R_ref[i][i] for i in range(len(R))) / len(R)


def add_transfer_gain(results: dict[str, dict[str, Any]]) -> bool:
    """Sets ``metrics["transfer_gain"]`` of every result against the isolated-LoRA result
    among them, and ``metrics["transfer_gain_rm"]`` against the rank-matched isolated LoRA's
    (:data:`RANK_MATCHED_METHOD`); False (nothing set) when neither ran."""
    found = False
    for key, ref_name in (("transfer_gain", REFERENCE_METHOD), ("transfer_gain_rm", RANK_MATCHED_METHOD)):
        ref = results.get(ref_name)
        if ref is None:
            continue
        found = True
        for r in results.values():
            r["metrics"][key] = transfer_gain(r["R"], ref["R"])
    return found

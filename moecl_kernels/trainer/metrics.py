"""Continual-learning metrics of the accuracy matrix (docs/spec.md §6).

``R[i][j]`` is the test accuracy on task j after training tasks 0..i (0-based here;
docs/spec.md §6 writes 1-based), ``b[j]`` the untrained model's accuracy on task j:

    ACC = mean_j R[T-1][j]
    BWT = mean_{i < T-1} (R[T-1][i] - R[i][i])     (forgetting: negative)
    FWT = mean_{i >= 1} (R[i-1][i] - b[i])          (transfer before training task i)

BWT and FWT are None for a single task.
"""

from __future__ import annotations

from typing import Optional, Sequence


def cl_metrics(R: Sequence[Sequence[float]], baseline: Sequence[float]) -> dict[str, Optional[float]]:
    T = len(R)
    if T == 0 or any(len(row) != T for row in R) or len(baseline) != T:
        raise ValueError(f"R must be a square T x T matrix and baseline length T; got {T} rows and {len(baseline)} baselines")
    last = R[T - 1]
    acc = sum(last) / T
    bwt = sum(last[i] - R[i][i] for i in range(T - 1)) / (T - 1) if T > 1 else None
    fwt = sum(R[i - 1][i] - baseline[i] for i in range(1, T)) / (T - 1) if T > 1 else None
    return {"ACC": acc, "BWT": bwt, "FWT": fwt}

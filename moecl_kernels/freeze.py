"""``mk.freeze_task`` / ``mk.unfreeze_task`` / ``mk.frozen_tasks``: per-task snapshots of the
gate and the shared expert in every injected module (``snapshots``; docs/spec.md §2)."""

from __future__ import annotations

import torch.nn as nn

from . import snapshots
from .integration import _layers, num_tasks


def freeze_task(model: nn.Module, task: int) -> None:
    """Freeze task ``task``'s gate and shared expert as they are now, in every injected module: its
    tokens use these snapshots from now on, whatever later training does to the live ones (its own
    expert is left as it is). Mixed batches still serve every task in one call per layer. Freezing
    a frozen task again retakes its snapshot. Memory: one gate and one shared expert per task."""
    layers = _layers(model)
    num_tasks(model)  # refuse layers that disagree; the first layer checks the task before anything changes
    for layer in layers.values():
        snapshots.freeze(layer, task)


def unfreeze_task(model: nn.Module, task: int) -> None:
    """Drop task ``task``'s snapshots: its tokens use the live gate and shared expert again."""
    layers = _layers(model)
    num_tasks(model)
    for layer in layers.values():
        snapshots.unfreeze(layer, task)


def frozen_tasks(model: nn.Module) -> list[int]:
    """The tasks frozen in every injected module (sorted)."""
    sets = [set(snapshots.frozen_tasks(layer)) for layer in _layers(model).values()]
    return sorted(set.intersection(*sets))

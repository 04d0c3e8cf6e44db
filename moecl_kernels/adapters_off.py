"""Which injected modules run as their plain base module right now (``mk.disable_adapters``).

A process-wide registry of module ids, filled for the length of a ``with mk.disable_adapters(model):``
block and empty otherwise, so the check each injected module makes at the top of its forward is
one truth test of an empty dict (also under ``torch.compile``, which guards on it)."""

from __future__ import annotations

import contextlib
import threading
from typing import Iterable, Iterator

import torch.nn as nn

_DISABLED: dict[int, int] = {}  # id(module) -> how many open blocks disable it
_lock = threading.Lock()


def disabled(module: nn.Module) -> bool:
    """True inside a ``disable_adapters`` block that covers ``module``."""
    return bool(_DISABLED) and id(module) in _DISABLED


@contextlib.contextmanager
def disabling(modules: Iterable[nn.Module]) -> Iterator[None]:
    """Mark ``modules`` disabled for the block (nested blocks count)."""
    ids = [id(m) for m in modules]
    with _lock:
        for i in ids:
            _DISABLED[i] = _DISABLED.get(i, 0) + 1
    try:
        yield
    finally:
        with _lock:
            for i in ids:
                if _DISABLED.get(i, 0) <= 1:
                    _DISABLED.pop(i, None)
                else:
                    _DISABLED[i] -= 1

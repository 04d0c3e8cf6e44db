"""Backend registry of the fused MoE-LoRA op: ``eager`` always; ``triton`` and ``cuda`` when available.

Backends register lazily (a factory, imported on first use) so ``import moecl_kernels``
never imports Triton or loads the CUDA extension.
"""

from __future__ import annotations

import os
import threading
import warnings
from typing import Callable, Optional

import torch
from torch import Tensor

from ..contract import Backend, BwdArgs, FwdArgs  # noqa: F401

ENV_VAR = "MOECL_BACKEND"


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run these tensors; the message says why."""


_factories: dict[str, Callable[[], Backend]] = {}
_instances: dict[str, Backend] = {}
_load_errors: dict[str, str] = {}
_lock = threading.Lock()
_warned: set[str] = set()


def register_backend(name: str, factory: Callable[[], Backend]) -> None:
    """Register ``factory`` (called once, lazily) as backend ``name``."""
    with _lock:
        _factories[name] = factory
        _instances.pop(name, None)
        _load_errors.pop(name, None)


def registered_backends() -> list[str]:
    return list(_factories)


def get_backend(name: str) -> Optional[Backend]:
    """The backend object, or None if its module failed to load (see ``load_error``)."""
    if name not in _factories:
        raise ValueError(f"backend={name!r} is unknown; known backends: {sorted(_factories)} (or 'auto')")
    with _lock:
        if name in _instances:
            return _instances[name]
        if name in _load_errors:
            return None
        try:
            inst = _factories[name]()
        except Exception as e:  # missing triton, extension not built, ...
            _load_errors[name] = f"{type(e).__name__}: {e}"
            return None
        _instances[name] = inst
        return inst


def load_error(name: str) -> Optional[str]:
    return _load_errors.get(name)


def warn_once(key: str, msg: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(msg, RuntimeWarning, stacklevel=3)


def _reason(name: str, x: Tensor) -> Optional[str]:
    b = get_backend(name)
    if b is None:
        return f"backend {name!r} could not be loaded ({_load_errors.get(name)})"
    return b.unavailable_reason(x)


def default_backend_name() -> str:
    return os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"


def resolve_backend(name: Optional[str], x: Tensor) -> str:
    """Resolve a backend request (None = ``$MOECL_BACKEND`` or ``auto``) to a concrete name.

    ``auto`` picks the highest-priority backend that can run ``x`` (on CPU tensors always
    ``eager``); an explicit
    backend that cannot raises :class:`BackendUnavailableError` saying why.
    """
    req = (name or default_backend_name()).lower()
    if req != "auto":
        if req not in _factories:
            raise ValueError(
                f"backend={req!r} is unknown; choose one of {['auto', *sorted(_factories)]} "
                f"(argument backend= or ${ENV_VAR})"
            )
        why = _reason(req, x)
        if why is not None:
            raise BackendUnavailableError(f"backend={req!r} is unavailable: {why}")
        return req
    if x.device.type == "cpu":
        # CPU tensors: eager. (Triton runs on CPU only under TRITON_INTERPRET=1, for tests.)
        return "eager"
    candidates, skipped = [], []
    for n in _factories:
        b = get_backend(n)
        why = _reason(n, x)
        if why is None:
            candidates.append((b.priority, n))
        elif b is None or b.priority > 0:  # a fast backend auto would have preferred
            skipped.append((b.priority if b is not None else 0, n, why))
    if not candidates:  # eager always runs; this means a broken install
        raise BackendUnavailableError(f"no backend can run tensors on {x.device} with dtype {x.dtype}")
    best_priority, best = max(candidates)
    for priority, n, why in skipped:
        if priority >= best_priority:
            warn_once(f"auto-{n}-{x.device.type}-{x.dtype}",
                      f"moecl_kernels: backend {n!r} is unavailable ({why}); MOECL_BACKEND=auto uses {best!r}")
    return best


def fallback_for_shape(name: str, x: Tensor, rank: int, num_experts: int) -> str:
    """``name``, or the best other backend if ``name`` cannot run this rank / expert count.

    A backend with kernel limits implements ``shape_unsupported_reason(rank, num_experts)``;
    when it objects, the op falls back (explicit request or not) and says so once.
    """
    check = getattr(backend(name), "shape_unsupported_reason", None)
    why = check(rank, num_experts) if check is not None else None
    if why is None:
        return name
    alternatives = []
    for n in _factories if x.device.type != "cpu" else ["eager"]:  # the same rule as auto
        b = get_backend(n)
        if n == name or b is None or b.priority < 0 or _reason(n, x) is not None:
            continue
        c = getattr(b, "shape_unsupported_reason", None)
        if c is None or c(rank, num_experts) is None:
            alternatives.append((b.priority, n))
    alt = max(alternatives)[1] if alternatives else "eager"
    warn_once(f"shape-{name}-{rank}-{num_experts}",
              f"moecl_kernels: backend {name!r} cannot run this layer ({why}); falling back to {alt!r}")
    return alt


def choose_backend(requested: Optional[str], x: Tensor, rank: int, num_experts: int) -> str:
    """The backend that runs this call: :func:`resolve_backend`, then :func:`fallback_for_shape`.

    While torch.compile traces, the choice is made once, eagerly, and baked into the graph
    as a constant (it depends only on the request, device, dtype and shape).
    """
    if torch.compiler.is_compiling():
        return _choose_constant(requested or default_backend_name(), x.device.type, x.device.index, x.dtype,
                                rank, num_experts)
    return fallback_for_shape(resolve_backend(requested, x), x, rank, num_experts)


@torch.compiler.assume_constant_result
def _choose_constant(requested: str, device_type: str, device_index: Optional[int], dtype: torch.dtype,
                     rank: int, num_experts: int) -> str:
    probe = torch.empty(0, device=torch.device(device_type, device_index), dtype=dtype)
    return fallback_for_shape(resolve_backend(requested, probe), probe, rank, num_experts)


def choose_ffn_backend(requested: Optional[str], x: Tensor, rank: int, num_experts: int) -> str:
    """:func:`choose_backend` for the FFN-level op: a backend without FFN kernels (no
    ``ffn_forward``) falls back to ``eager`` for it, saying so once."""
    name = choose_backend(requested, x, rank, num_experts)
    return _ffn_constant(name) if torch.compiler.is_compiling() else _ffn_capable(name)


def _ffn_capable(name: str) -> str:
    if hasattr(backend(name), "ffn_forward"):
        return name
    warn_once(f"ffn-{name}", f"moecl_kernels: backend {name!r} has no FFN-level kernels; the FFN op runs on 'eager'")
    return "eager"


@torch.compiler.assume_constant_result
def _ffn_constant(name: str) -> str:
    return _ffn_capable(name)


def backend(name: str) -> Backend:
    b = get_backend(name)
    if b is None:
        raise BackendUnavailableError(f"backend={name!r} is unavailable: {_load_errors.get(name)}")
    return b


def _eager() -> Backend:
    from .eager import EagerBackend

    return EagerBackend()


def _reference() -> Backend:
    from ..contract.reference import ReferenceBackend

    return ReferenceBackend()


def _triton() -> Backend:
    from .triton import TritonBackend  # noqa: F401  (arrives with the Triton backend)

    return TritonBackend()


def _cuda() -> Backend:
    from .cuda import CudaBackend

    return CudaBackend()


register_backend("eager", _eager)
register_backend("reference", _reference)
register_backend("triton", _triton)
register_backend("cuda", _cuda)

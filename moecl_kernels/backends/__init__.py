"""Backend registry of the fused MoE-LoRA op: ``eager`` always; ``triton`` and ``cuda`` when available.

Backends register lazily (a factory, imported on first use) so ``import moecl_kernels``
never imports Triton or loads the CUDA extension.

``auto`` on CUDA tensors takes the first available backend of an order read from a
committed table, ``auto_choice.json`` beside this file: per GPU architecture (``sm_90``)
and case (``<dtype>/<tokens>``: ``bf16/decode`` for T <= 64, ``bf16/large`` above; or
just ``<dtype>``; or ``*``), the backends fastest first, as a GPU benchmark run measured
them. Without an entry for the device and case, its ``default`` order applies: triton,
then cuda, then eager -- until a GPU measures both, the review's prediction (pipelined
Triton GEMMs, one pass over x in each direction) decides, not a constant in the code.
Registered backends the order does not name come after it, highest ``priority`` first.
"""

from __future__ import annotations

import functools
import json
import os
import threading
import warnings
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import Tensor

from ..contract import Backend, BwdArgs, FwdArgs  # noqa: F401

ENV_VAR = "MOECL_BACKEND"
AUTO_TABLE = Path(__file__).with_name("auto_choice.json")
DECODE_TOKENS = 64  # token counts up to this are the "decode" case of the auto table


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


@functools.cache
def auto_table() -> dict:
    """The committed auto-choice table (``auto_choice.json``), read once."""
    table = json.loads(AUTO_TABLE.read_text())
    if not isinstance(table.get("default"), list) or not isinstance(table.get("measured"), dict):
        raise ValueError(f"{AUTO_TABLE}: needs a 'default' list and a 'measured' object")
    return table


def device_arch(device) -> Optional[str]:
    """``sm_XY`` of a CUDA device (None when it cannot be queried)."""
    try:
        major, minor = _capability(device.index if device.index is not None else torch.cuda.current_device())
    except Exception:  # no CUDA runtime here (a fake device in tests, a CPU-only torch)
        return None
    return f"sm_{major}{minor}"


@functools.cache
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def case_key(dtype: torch.dtype, tokens: Optional[int]) -> str:
    """The auto table's case of a call: ``bf16/decode``, ``fp16/large``, or ``bf16`` when the
    token count is unknown (symbolic, under torch.compile)."""
    name = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}.get(dtype, str(dtype))
    if tokens is None:
        return name
    return f"{name}/{'decode' if tokens <= DECODE_TOKENS else 'large'}"


def auto_order(arch: Optional[str], case: str) -> list[str]:
    """Registered backends in ``auto``'s order of preference for ``arch`` and ``case``."""
    table = auto_table()
    per_arch = table["measured"].get(arch or "", {})
    key = next((k for k in (case, case.split("/")[0], "*") if k in per_arch), None)
    order = [n for n in (per_arch[key] if key is not None else table["default"]) if n in _factories]
    rest = [n for n in _factories if n not in order]
    rest.sort(key=lambda n: -getattr(get_backend(n), "priority", 0))
    return order + rest


def _tokens(x) -> Optional[int]:
    shape = getattr(x, "shape", None)
    n = shape[0] if shape else None
    return n if isinstance(n, int) else None


def resolve_backend(name: Optional[str], x: Tensor) -> str:
    """Resolve a backend request (None = ``$MOECL_BACKEND`` or ``auto``) to a concrete name.

    ``auto`` picks the first backend of :func:`auto_order` that can run ``x`` (on CPU
    tensors always ``eager``); an explicit backend that cannot raises
    :class:`BackendUnavailableError` saying why.
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
    skipped = []
    for n in auto_order(device_arch(x.device), case_key(x.dtype, _tokens(x))):
        b = get_backend(n)
        why = _reason(n, x)
        if why is None:
            for m, why_m in skipped:  # a backend auto would have preferred
                warn_once(f"auto-{m}-{x.device.type}-{x.dtype}",
                          f"moecl_kernels: backend {m!r} is unavailable ({why_m}); MOECL_BACKEND=auto uses {n!r}")
            return n
        if b is None or b.priority >= 0:
            skipped.append((n, why))
    # eager always runs; this means a broken install
    raise BackendUnavailableError(f"no backend can run tensors on {x.device} with dtype {x.dtype}")


def fallback_for_shape(name: str, x: Tensor, rank: int, num_experts: int) -> str:
    """``name``, or the best other backend if ``name`` cannot run this rank / expert count.

    A backend with kernel limits implements ``shape_unsupported_reason(rank, num_experts)``;
    when it objects, the op falls back (explicit request or not) and says so once.
    """
    check = getattr(backend(name), "shape_unsupported_reason", None)
    why = check(rank, num_experts) if check is not None else None
    if why is None:
        return name
    order = auto_order(device_arch(x.device), case_key(x.dtype, _tokens(x))) if x.device.type != "cpu" else ["eager"]
    alt = "eager"
    for n in order:  # the same rule as auto
        b = get_backend(n)
        if n == name or b is None or b.priority < 0 or _reason(n, x) is not None:
            continue
        c = getattr(b, "shape_unsupported_reason", None)
        if c is None or c(rank, num_experts) is None:
            alt = n
            break
    warn_once(f"shape-{name}-{rank}-{num_experts}",
              f"moecl_kernels: backend {name!r} cannot run this layer ({why}); falling back to {alt!r}")
    return alt


def choose_backend(requested: Optional[str], x: Tensor, rank: int, num_experts: int) -> str:
    """The backend that runs this call: :func:`resolve_backend`, then :func:`fallback_for_shape`.

    While torch.compile traces, the choice is made once, eagerly, and baked into the graph
    as a constant (it depends only on the request, device, dtype and shape).
    """
    if torch.compiler.is_compiling():
        tokens = _tokens(x)  # a symbolic token count (dynamic shapes): the table's dtype-only case
        return _choose_constant(requested or default_backend_name(), x.device.type, x.device.index, x.dtype,
                                rank, num_experts, -1 if tokens is None else tokens)
    return fallback_for_shape(resolve_backend(requested, x), x, rank, num_experts)


@torch.compiler.assume_constant_result
def _choose_constant(requested: str, device_type: str, device_index: Optional[int], dtype: torch.dtype,
                     rank: int, num_experts: int, tokens: int) -> str:
    # [tokens, 0] (no memory) carries the token count; 0-dim: unknown
    probe = torch.empty((tokens, 0) if tokens >= 0 else (), device=torch.device(device_type, device_index), dtype=dtype)
    return fallback_for_shape(resolve_backend(requested, probe), probe, rank, num_experts)


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

"""Routing: task ids -> the token->task map, the tokens grouped by task, segment offsets
and pooling weights, for one input.

Everything is computed on the tensors' device with no host sync; when the task ids
arrive on the host (the usual case: they come from a data loader) the router also
records the host-side offsets and whether the batch has a single task, so the kernels
can take their no-sort fast path and the eager backend needs no sync.

Shapes (docs/spec.md, "Routing"): for an input whose tokens have the leading shape
``token_shape`` (``[B, S]`` for a ``[B, S, d]`` input), task ids are one int (every
token), ``[B]`` (per sequence) or ``[B, S]`` (per token); anything else is an error that
names the expected and the given shape. A flattened input (``token_shape = [T]``) takes
``[T]`` per-token ids, or ``[n]`` with ``n`` dividing ``T`` (``T // n`` consecutive tokens
per sequence) when nothing tells the batch apart.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from ..contract import SINGLE_MIXED, SINGLE_NONE

TaskIds = Union[int, Sequence[int], Tensor]


class RoutingError(ValueError):
    """Task ids that do not fit the model or the batch, or no routing in force; the message
    names the argument."""


@dataclass
class Routing:
    token_task: Tensor  # int32 [T]
    sorted_idx: Tensor  # int32 [T]
    expert_offsets: Tensor  # int32 [E+1]
    num_tasks: int
    single_task: int = SINGLE_MIXED
    offsets_cpu: Optional[Tensor] = None  # int64 [E+1], host copy when known without a sync
    batch_shape: Optional[tuple] = None  # (B, S) when the tokens have a [batch, seq] layout
    attention_mask: Optional[Tensor] = None  # [B, S]
    _pool: Optional[Tensor] = field(default=None, repr=False)

    @property
    def num_tokens(self) -> int:
        return self.token_task.shape[0]

    def pool_weights(self, dtype=torch.float32) -> Tensor:
        """[B, S] mean-pooling weights over each sequence's attended tokens (rows sum to 1)."""
        if self.batch_shape is None:
            raise RoutingError("pooling needs a [batch, seq] layout: the input has flattened tokens")
        if self._pool is None:
            B, S = self.batch_shape
            dev = self.token_task.device
            if self.attention_mask is not None:
                m = self.attention_mask.to(device=dev, dtype=torch.float32)
                if tuple(m.shape) != (B, S):
                    raise RoutingError(
                        f"attention_mask has shape {tuple(m.shape)} but the layer input is [batch={B}, seq={S}]"
                    )
            else:
                m = torch.ones(B, S, device=dev)
            self._pool = m / m.sum(1, keepdim=True).clamp(min=1.0)
        return self._pool.to(dtype)


def as_task_tensor(task_ids: TaskIds, name: str = "task_ids") -> Tensor:
    """``task_ids`` as an integer tensor (0-d for one int); numpy integers count as ints."""
    if isinstance(task_ids, Tensor):
        t = task_ids
    elif isinstance(task_ids, numbers.Integral) and not isinstance(task_ids, bool):
        t = torch.tensor(int(task_ids))
    elif hasattr(task_ids, "__array__") and not isinstance(task_ids, (str, bytes)):  # numpy arrays
        t = torch.as_tensor(task_ids)
    else:
        try:
            t = torch.as_tensor([int(v) if isinstance(v, numbers.Integral) else v for v in task_ids])
        except Exception as e:
            raise RoutingError(
                f"{name} must be an int, a sequence of ints or an integer tensor; got {type(task_ids).__name__}"
            ) from e
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise RoutingError(f"{name} must hold integer task ids, got dtype {t.dtype}")
    return t


def check_task_range(t: Tensor, num_tasks: int, name: str = "task_ids") -> None:
    """Raise if any id is outside [-1, num_tasks).

    Host tensors are checked directly. Device tensors cost one sync, except while
    tracing (torch.compile) or capturing a CUDA graph, where an asynchronous device-side
    assert takes its place (same message, reported at the next synchronisation).
    """
    if t.numel() == 0:
        return
    traced = torch.compiler.is_compiling() or (t.device.type == "cuda" and torch.cuda.is_current_stream_capturing())
    if traced:
        ok = ((t >= -1) & (t < num_tasks)).all()
        torch._assert_async(ok, f"{name} contains a task id outside [-1, {num_tasks - 1}] (num_tasks={num_tasks})")
        return
    lo, hi = (int(v) for v in torch.aminmax(t.long()))
    if lo < -1 or hi >= num_tasks:
        bad = lo if lo < -1 else hi
        raise RoutingError(
            f"{name} contains task id {bad}, outside [-1, {num_tasks - 1}] (num_tasks={num_tasks}; -1 = no task)"
        )


def _shape_error(name: str, t: Tensor, token_shape: tuple) -> RoutingError:
    if len(token_shape) >= 2:
        want = f"one int, [{token_shape[0]}] (per sequence) or [{token_shape[0]}, {token_shape[1]}] (per token)"
    else:
        want = f"one int, [{token_shape[0]}] (per token) or [n] with n dividing {token_shape[0]} (per sequence)"
    return RoutingError(
        f"{name} has shape {list(t.shape)} but the input's tokens are {list(token_shape)}: give {want}"
    )


def token_task_ids(t: Tensor, token_shape: Sequence[int], name: str = "task_ids",
                   batch_shape: Optional[tuple] = None, expand_batch: bool = False) -> tuple[Tensor, Optional[tuple]]:
    """Per-token ids [T] for tokens of leading shape ``token_shape``, and the (B, S) layout.

    ``batch_shape``: the (B, S) of the call the ids came with, for a flattened input.
    ``expand_batch``: per-sequence ids [B] also route an input of k*B sequences, each id
    covering k consecutive sequences (generate() with beams / several return sequences).
    """
    token_shape = tuple(int(s) for s in token_shape)
    T = 1
    for s in token_shape:
        T *= s
    if len(token_shape) >= 2:
        B, S = token_shape[0], T // max(token_shape[0], 1)
        layout = (B, S)
    else:
        layout = batch_shape if batch_shape is not None and batch_shape[0] * batch_shape[1] == T else None
        B = layout[0] if layout is not None else None
    if t.dim() == 0:
        return t.reshape(1).expand(T), layout
    if t.dim() >= 2 and tuple(t.shape) == token_shape:  # per token, the input's own leading shape
        return t.reshape(-1), layout
    if t.dim() == 1:
        n = t.shape[0]
        if B is not None:
            if n == B:
                return (t.repeat_interleave(T // B) if B and T // B != 1 else t), layout
            if expand_batch and n > 0 and B % n == 0:
                return t.repeat_interleave(T // n), layout
            raise _shape_error(name, t, token_shape if layout is None else (B, T // max(B, 1)))
        if n == T:
            return t, layout
        if n > 0 and T % n == 0:
            return t.repeat_interleave(T // n), (n, T // n)
        raise _shape_error(name, t, token_shape)
    # per token [B, S]
    if layout is not None and tuple(t.shape) == tuple(layout):
        return t.reshape(-1), layout
    raise _shape_error(name, t, token_shape if layout is None else layout)


def build_routing(
    task_ids: TaskIds,
    num_tasks: int,
    num_tokens: Optional[int] = None,
    device: Union[torch.device, str, None] = None,
    attention_mask: Optional[Tensor] = None,
    name: str = "task_ids",
    token_shape: Optional[Sequence[int]] = None,
    batch_shape: Optional[tuple] = None,
    expand_batch: bool = False,
) -> Routing:
    """Routing for an input whose tokens have the leading shape ``token_shape`` (or
    ``num_tokens`` flattened tokens); see the module docstring for the accepted shapes."""
    t = as_task_tensor(task_ids, name)
    if token_shape is None:
        if num_tokens is None:
            raise ValueError("build_routing needs num_tokens or token_shape")
        token_shape = (int(num_tokens),)
    check_task_range(t, num_tasks, name)
    tok, layout = token_task_ids(t, token_shape, name, batch_shape, expand_batch)

    dev = torch.device(device) if device is not None else t.device
    # Group tokens by task where the ids are (the host, usually), then move the result.
    # scatter_add rather than bincount: a static output shape (traceable by torch.compile).
    key = torch.where(tok < 0, torch.full_like(tok, num_tasks), tok).long()
    counts = torch.zeros(num_tasks + 1, dtype=torch.int64, device=key.device).scatter_add_(0, key, torch.ones_like(key))
    offsets = torch.zeros(num_tasks + 1, dtype=torch.int64, device=key.device)
    offsets[1:] = torch.cumsum(counts[:num_tasks], 0)
    sorted_idx = torch.argsort(key, stable=True).to(torch.int32)
    single, offsets_cpu = SINGLE_MIXED, None
    if key.device.type == "cpu" and not torch.compiler.is_compiling():
        # host-side analysis: free, no device sync (skipped while tracing: it is data-dependent)
        offsets_cpu = offsets
        present = (counts > 0).nonzero().flatten().tolist()
        if len(present) == 1:
            single = SINGLE_NONE if present[0] == num_tasks else present[0]
    return Routing(
        token_task=tok.to(device=dev, dtype=torch.int32),
        sorted_idx=sorted_idx.to(dev),
        expert_offsets=offsets.to(device=dev, dtype=torch.int32),
        num_tasks=num_tasks,
        single_task=single,
        offsets_cpu=offsets_cpu,
        batch_shape=layout,
        attention_mask=attention_mask,
    )

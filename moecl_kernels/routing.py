"""Routing: per-sequence (or per-token) task ids -> the token->task map, the tokens
grouped by task, segment offsets and pooling weights.

Built once per model forward and shared by every injected layer (see
``integration.RoutingContext``). Everything is computed on the tensors' device with
no host sync; when the task ids arrive on the host (the usual case: they come from a
data loader) the router also records the host-side offsets and whether the batch
has a single task, so the kernels can take their no-sort fast path and the eager
backend needs no sync.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from .backends.base import SINGLE_MIXED, SINGLE_NONE

TaskIds = Union[int, Sequence[int], Tensor]


class RoutingError(ValueError):
    """Task ids that do not fit the model or the batch; the message names the argument."""


@dataclass
class Routing:
    token_task: Tensor  # int32 [T]
    sorted_idx: Tensor  # int32 [T]
    expert_offsets: Tensor  # int32 [E+1]
    num_tasks: int
    single_task: int = SINGLE_MIXED
    offsets_cpu: Optional[Tensor] = None  # int64 [E+1], host copy when known without a sync
    batch_shape: Optional[tuple] = None  # (B, S) when built from per-sequence ids
    attention_mask: Optional[Tensor] = None  # [B, S]
    _pool: Optional[Tensor] = field(default=None, repr=False)

    @property
    def num_tokens(self) -> int:
        return self.token_task.shape[0]

    def pool_weights(self, dtype=torch.float32) -> Tensor:
        """[B, S] mean-pooling weights over each sequence's attended tokens (rows sum to 1)."""
        if self.batch_shape is None:
            raise RoutingError("pooling needs a [batch, seq] layout: build the routing from per-sequence task_ids")
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


def _as_tensor(task_ids: TaskIds, name: str) -> Tensor:
    if isinstance(task_ids, Tensor):
        t = task_ids
    elif isinstance(task_ids, int):
        t = torch.tensor([task_ids])
    else:
        try:
            t = torch.as_tensor(list(task_ids))
        except Exception as e:
            raise RoutingError(f"{name} must be an int, a sequence of ints or a LongTensor; got {type(task_ids)}") from e
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


def build_routing(
    task_ids: TaskIds,
    num_tasks: int,
    num_tokens: int,
    device: Union[torch.device, str, None] = None,
    attention_mask: Optional[Tensor] = None,
    name: str = "task_ids",
) -> Routing:
    """Routing for ``num_tokens`` flattened tokens.

    ``task_ids`` is per sequence ([B], broadcast over the ``num_tokens // B`` tokens of
    each sequence), per token (any shape of ``num_tokens`` ids, e.g. [B, S]), or one int
    for the whole batch. A 1-D tensor of ``num_tokens`` ids is per token.
    """
    t = _as_tensor(task_ids, name)
    check_task_range(t, num_tasks, name)
    if t.dim() == 0 or (t.dim() == 1 and t.numel() == 1 and num_tokens != 1):
        t = t.reshape(1)
    batch_shape = None
    if t.dim() == 1:
        B = t.shape[0]
        if B == 0 or num_tokens % B != 0:
            raise RoutingError(
                f"{name} has {B} entries but the input has {num_tokens} tokens: give one id per sequence "
                "(a divisor of the token count) or one per token"
            )
        S = num_tokens // B
        batch_shape = (B, S)
        tok = t.repeat_interleave(S) if S > 1 else t
    else:  # per token, any shape with one id per token ([B, S], [B, S1, S2], ...)
        if t.numel() != num_tokens:
            raise RoutingError(f"{name} has shape {tuple(t.shape)} ({t.numel()} ids) but the input has {num_tokens} tokens")
        batch_shape = (t.shape[0], num_tokens // t.shape[0])
        tok = t.reshape(-1)

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
        batch_shape=batch_shape,
        attention_mask=attention_mask,
    )

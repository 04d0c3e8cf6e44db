"""The routing in force: which task ids route the injected layers of the call being run.

A :class:`RoutingContext` holds the task ids (and attention mask) of exactly one call:

* ``module(..., task_ids=t)`` on any module that contains routed layers: opened by the
  module's forward pre-hook (:func:`open_hook`, installed by ``mk.inject``) and closed by
  its forward hook when the call returns or raises (:func:`close_hook`);
* a ``with mk.use_tasks(module, t):`` block (``generate()``, custom loops).

Nothing is stored on the model: open contexts live on a per-thread stack, and a layer
finds its routing by asking for the innermost open context whose owner contains it
(:func:`context_for`). A layer that no context covers raises (docs/spec.md,
"missing routing"). Within one context the routing of each input shape is built once and
shared by every layer of the call.

**Activation checkpointing.** A checkpointed block is run again during the backward pass,
after its call has ended (or while a later call's context is open). Contexts opened with
autograd on record the range of autograd sequence numbers their call created; a layer run
during a backward pass takes the context whose range holds the autograd node being
executed (the checkpoint node, or the node whose saved tensors are being recomputed), so it
routes exactly as the original forward did -- for HF ``gradient_checkpointing_enable`` and
``torch.utils.checkpoint`` in both modes. The autograd graph keeps such a context alive
(it is attached to the graph's nodes) until the graph is freed.
"""

from __future__ import annotations

import collections
import threading
import weakref
from typing import Any, Optional, Sequence
from weakref import WeakKeyDictionary

import torch
import torch.nn as nn
from torch import Tensor

from .build import Routing, RoutingError, TaskIds, as_task_tensor, build_routing

MISSING_ROUTING = (
    "task_ids is missing: no routing is in force for this layer. Call it, or the model or any module that "
    "contains it, with task_ids=t, or wrap the call in `with mk.use_tasks(model, t):` (generate() and custom loops). "
    "With the Hugging Face Trainer, set TrainingArguments(remove_unused_columns=False): by default it drops the "
    "task_ids column because the model's forward does not name it"
)
_TOKEN_KWARGS = ("input_ids", "inputs_embeds", "hidden_states", "x", "input")


class RoutedModule(nn.Module):
    """Base of the modules that take task routing (the fused layers). Marks them for
    :func:`routed_modules` and gives them :meth:`routing_for`."""

    num_tasks: int

    def routing_for(self, x_lead: Sequence[int], device: torch.device, task_ids: Optional[TaskIds] = None,
                    routing: Optional[Routing] = None) -> tuple[Routing, Optional["RoutingContext"]]:
        """The routing of an input with leading shape ``x_lead``: ``routing`` if given, else
        built from ``task_ids``, else from the context in force (and that context)."""
        if routing is not None:
            return routing, None
        if task_ids is not None:
            return build_routing(task_ids, self.num_tasks, device=device, token_shape=tuple(x_lead)), None
        ctx = context_for(self)
        return ctx.routing(tuple(x_lead), self.num_tasks, device), ctx


# --------------------------------------------------------------------------- the routed modules of a module
_generation = 0
_covered: "WeakKeyDictionary[nn.Module, tuple[int, frozenset]]" = WeakKeyDictionary()


def structure_changed() -> None:
    """Invalidate the cached sets of routed modules (a routed module was created or injected)."""
    global _generation
    _generation += 1


def _routed_ids(owner: nn.Module) -> frozenset:
    return frozenset(id(m) for m in owner.modules() if isinstance(m, RoutedModule))


def routed_modules(owner: nn.Module) -> frozenset:
    """ids of the routed modules inside ``owner`` (itself included), cached until the structure
    changes (the owner keeps them alive, so the ids stay theirs). While torch.compile traces,
    computed afresh: no weak containers in the traced code."""
    if torch.compiler.is_compiling():
        return _routed_ids(owner)
    hit = _covered.get(owner)
    if hit is None or hit[0] != _generation:
        hit = (_generation, _routed_ids(owner))
        _covered[owner] = hit
    return hit[1]


# --------------------------------------------------------------------------- contexts
class RoutingContext:
    """The task ids of one call (or one ``use_tasks`` block) and the routings built from them."""

    def __init__(self, owner: nn.Module, task_ids: TaskIds, attention_mask: Optional[Tensor] = None,
                 token_shape: Optional[tuple] = None, expand_batch: bool = False, name: str = "task_ids") -> None:
        self.owner = owner
        self.name = name
        self.task_ids = as_task_tensor(task_ids, name)
        self.expand_batch = expand_batch
        self.token_shape = token_shape  # (B, S) of the call's tokens, when known
        self.attention_mask = _check_mask(attention_mask, self.task_ids, token_shape, name)
        self.layers = routed_modules(owner)
        self._routings: dict[tuple, Routing] = {}
        self._mask_seen = False  # has a forward with [B, S] tokens been routed (the mask checked against it)
        self.pooled: dict[nn.Module, Tensor] = {}
        self.graph_task = -1
        self.by_hook = False  # opened by open_hook (closed by close_hook), not by use_tasks
        self.seq_range: Optional[list] = None  # [first, end) autograd sequence numbers of the call
        self.attached = False  # tied to an autograd graph by keep_alive

    def covers(self, module: nn.Module) -> bool:
        return id(module) in self.layers

    def routing(self, x_lead: tuple, num_tasks: int, device: torch.device) -> Routing:
        """The routing for an input of leading shape ``x_lead`` (built once per shape and device)."""
        key = (x_lead, str(device), num_tasks)
        r = self._routings.get(key)
        if r is None:
            r = build_routing(self.task_ids, num_tasks, device=device, token_shape=x_lead, name=self.name,
                              batch_shape=self.token_shape, expand_batch=self.expand_batch)
            if self.attention_mask is not None and r.batch_shape is not None:
                r.attention_mask = self._mask_for(tuple(r.batch_shape))
            self._routings[key] = r
        return r

    def _mask_for(self, batch_shape: tuple) -> Optional[Tensor]:
        """The attention mask for a forward whose tokens are ``batch_shape`` [B, S]: the mask itself,
        its rows repeated for generate()'s k*B expanded batch, or None for a later forward of another
        shape (a decode step). The first forward of the block must fit it: a mask of another shape
        is an error, not a mask silently ignored."""
        m = self.attention_mask
        first = not self._mask_seen
        self._mask_seen = True
        (B, S), (mB, mS) = batch_shape, tuple(m.shape)
        if (B, S) == (mB, mS):
            return m
        if S == mS and self.expand_batch and B % mB == 0:
            return m.repeat_interleave(B // mB, dim=0)  # beams / several return sequences: k consecutive copies
        if first:
            raise RoutingError(f"attention_mask has shape {list(m.shape)} but the first forward in this routing's "
                               f"block has tokens {list(batch_shape)}: give the [batch, seq] mask of that input")
        return None

    def store_pooled(self, layer: nn.Module, p: Tensor) -> None:
        self.pooled[layer] = p


def _check_mask(mask: Optional[Tensor], ids: Tensor, token_shape: Optional[tuple], name: str) -> Optional[Tensor]:
    if mask is None:
        return None
    if not isinstance(mask, Tensor) or mask.dim() != 2:
        raise RoutingError(f"attention_mask must be a [batch, seq] tensor, got {getattr(mask, 'shape', type(mask))}")
    B = ids.shape[0] if ids.dim() >= 1 else None
    if B is not None and mask.shape[0] != B:
        raise RoutingError(
            f"attention_mask has shape {list(mask.shape)} but {name} has {B} sequences ({name}: {list(ids.shape)})"
        )
    if token_shape is not None and tuple(mask.shape) != tuple(token_shape):
        raise RoutingError(f"attention_mask has shape {list(mask.shape)} but the input's tokens are {list(token_shape)}")
    return mask


class _State(threading.local):
    def __init__(self) -> None:
        self.stack: list[RoutingContext] = []


_local = _State()
_recorded: list = []  # weakrefs to contexts opened with autograd on (any thread: backward runs on device threads)
_recorded_lock = threading.Lock()
# Contexts no graph holds when they end (a reentrant checkpoint inside a use_tasks block: its layers run
# without autograd): the last few are kept so that a backward after the block still finds them.
_unattached: collections.deque = collections.deque(maxlen=32)


def push(ctx: RoutingContext) -> RoutingContext:
    """Put ``ctx`` in force (innermost)."""
    if not torch.compiler.is_compiling():
        ctx.graph_task = torch._C._current_graph_task_id()
        if torch.is_grad_enabled():
            ctx.seq_range = [torch._C._autograd._get_sequence_nr(), None]
            with _recorded_lock:
                if len(_recorded) > 64:
                    _recorded[:] = [w for w in _recorded if w() is not None]
                _recorded.append(weakref.ref(ctx))
    _local.stack.append(ctx)
    return ctx


def pop(ctx: RoutingContext) -> None:
    """End ``ctx`` (the innermost context, opened by :func:`push`)."""
    st = _local.stack
    if st and st[-1] is ctx:
        st.pop()
    elif ctx in st:  # out of order (a generator-based use_tasks closed late): drop it anyway
        st.remove(ctx)
    if ctx.seq_range is not None and not torch.compiler.is_compiling():
        ctx.seq_range[1] = torch._C._autograd._get_sequence_nr()
        if not ctx.attached:
            _unattached.append(ctx)


def keep_alive(t: Any, ctxs: Sequence[RoutingContext]) -> None:
    """Tie ``ctxs`` to the autograd graph of tensor ``t`` (for recomputation in backward)."""
    if torch.compiler.is_compiling():
        return  # compiled graphs recompute inside the graph, never through the layers
    fn = getattr(t, "grad_fn", None)
    if fn is None:
        return
    held = fn.metadata.setdefault("moecl_routing", [])
    for c in ctxs:
        if c.seq_range is not None and not any(h is c for h in held):
            held.append(c)
            c.attached = True


def _recorded_for(module: nn.Module) -> Optional[RoutingContext]:
    node = torch._C._current_autograd_node()
    if node is None:
        return None
    seq = node._sequence_nr()
    best = None
    with _recorded_lock:
        refs = list(_recorded)
    for w in refs:
        c = w()
        if c is None or c.seq_range is None or not c.covers(module):
            continue
        lo, hi = c.seq_range
        if lo <= seq and (hi is None or seq < hi) and (best is None or lo >= best.seq_range[0]):
            best = c  # the innermost (latest-opened) context holding the node
    return best


def context_for(module: nn.Module) -> RoutingContext:
    """The routing context in force for ``module``; raises :class:`RoutingError` if none."""
    stack = _local.stack
    if torch.compiler.is_compiling():
        for c in reversed(stack):
            if c.covers(module):
                return c
        raise RoutingError(MISSING_ROUTING)
    gt = torch._C._current_graph_task_id()
    for c in reversed(stack):
        # during a backward pass only contexts opened inside it count (a recomputed block that was
        # itself called with task_ids=); the others belong to other calls
        if (gt == -1 or c.graph_task == gt) and c.covers(module):
            return c
    if gt != -1:
        c = _recorded_for(module)
        if c is not None:
            return c
        raise RoutingError(
            MISSING_ROUTING + ". A layer is being recomputed in backward (activation checkpointing) but the "
            "call that ran it is gone: keep its outputs alive until backward, or pass task_ids= to the "
            "checkpointed call"
        )
    raise RoutingError(MISSING_ROUTING)


def active_contexts() -> list[RoutingContext]:
    """The open contexts of this thread, innermost last (for tests and debugging)."""
    return list(_local.stack)


# --------------------------------------------------------------------------- the hooks mk.inject installs
def _token_shape(args: tuple, kwargs: dict) -> Optional[tuple]:
    """(B, S) of a call's token input: input_ids [B, S] or embeddings [B, S, d]."""
    t = next((kwargs[k] for k in _TOKEN_KWARGS if isinstance(kwargs.get(k), Tensor)), None)
    if t is None and args and isinstance(args[0], Tensor):
        t = args[0]
    if t is None or t.dim() < 2:
        return None
    if t.is_floating_point():
        return tuple(t.shape[:2]) if t.dim() >= 3 else None
    return tuple(t.shape[:2])


def _call_mask(args: tuple, kwargs: dict) -> Optional[Tensor]:
    mask = kwargs.get("attention_mask")
    if mask is None and len(args) >= 2 and isinstance(args[0], Tensor) and isinstance(args[1], Tensor):
        mask = args[1]  # HF forward(input_ids, attention_mask, ...)
    if isinstance(mask, Tensor) and mask.dim() == 2:
        return mask
    return None  # 4-D attention biases inside a model are not padding masks


def open_hook(module: nn.Module, args: tuple, kwargs: dict):
    """Forward pre-hook (with kwargs): ``task_ids=`` opens a routing context for this call."""
    if "task_ids" not in kwargs:
        return None
    ids = kwargs.pop("task_ids")
    if ids is None:
        return args, kwargs
    shape = _token_shape(args, kwargs)
    ctx = RoutingContext(module, ids, _call_mask(args, kwargs), token_shape=shape)
    if shape is not None and ctx.task_ids.dim() >= 1:
        # fail at the call, naming both shapes, rather than at the first layer
        ok = ctx.task_ids.shape[0] == shape[0] and (ctx.task_ids.dim() == 1 or tuple(ctx.task_ids.shape) == shape)
        if not ok:
            raise RoutingError(
                f"task_ids has shape {list(ctx.task_ids.shape)} but the input's tokens are {list(shape)}: give one int, "
                f"[{shape[0]}] (per sequence) or [{shape[0]}, {shape[1]}] (per token)"
            )
    ctx.by_hook = True
    push(ctx)
    return args, kwargs


def close_hook(module: nn.Module, args: tuple, output: Any) -> None:
    """Forward hook (always called, also on exceptions): ends the context this call opened."""
    st = _local.stack
    if not st:
        return
    if output is not None and torch.is_grad_enabled():
        # the graph of this call's outputs may recompute its layers in backward: tie every context
        # in force to it (the one this call opened, and those of use_tasks blocks around it)
        for t in _output_tensors(output):
            keep_alive(t, st)
    if st[-1].owner is not module or not st[-1].by_hook:
        return
    ctx = st[-1]
    pop(ctx)
    if ctx.pooled or PooledResults.ATTR in module.__dict__:
        PooledResults.of(module).set(ctx.pooled)


def _output_tensors(output: Any) -> list:
    if isinstance(output, Tensor):
        return [output]
    values = output.values() if isinstance(output, dict) else output if isinstance(output, (tuple, list)) else ()
    return [v for v in values if isinstance(v, Tensor)]


class PooledResults:
    """The pooled shared-path outputs p_n of the last call that opened routing on a module
    (``mk.collect_pooled``). Never copied or pickled with the module: they hold graphs."""

    ATTR = "_moecl_pooled"

    def __init__(self) -> None:
        self.by_layer: dict = {}

    @classmethod
    def of(cls, module: nn.Module) -> "PooledResults":
        res = module.__dict__.get(cls.ATTR)
        if res is None:
            res = cls()
            module.__dict__[cls.ATTR] = res
        return res

    def set(self, by_layer: dict) -> None:
        self.by_layer = dict(by_layer)

    def __deepcopy__(self, memo) -> "PooledResults":
        return PooledResults()

    def __getstate__(self) -> dict:
        return {"by_layer": {}}

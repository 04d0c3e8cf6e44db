"""Task routing: task ids -> per-token routing (``build``), and the routing in force for the
call being run (``context``). See docs/spec.md, "Routing"."""

from .build import Routing, RoutingError, TaskIds, as_task_tensor, build_routing, check_task_range, token_task_ids
from .context import (
    MISSING_ROUTING,
    PooledResults,
    RoutedModule,
    RoutingContext,
    active_contexts,
    close_hook,
    context_for,
    keep_alive,
    open_hook,
    pop,
    push,
    routed_modules,
    structure_changed,
)

__all__ = [
    "Routing", "RoutingError", "TaskIds", "as_task_tensor", "build_routing", "check_task_range", "token_task_ids",
    "MISSING_ROUTING", "PooledResults", "RoutedModule", "RoutingContext", "active_contexts", "close_hook",
    "context_for", "keep_alive", "open_hook", "pop", "push", "routed_modules", "structure_changed",
]

"""moecl-kernels: fused MoE-LoRA kernels for MoE-CL continual instruction tuning.

    import moecl_kernels as mk
    model = mk.inject(hf_model, target_modules=["gate_proj", "up_proj", "down_proj"], num_tasks=4)
    model = mk.inject(hf_model, num_tasks=4, level="ffn")   # or: whole-MLP experts (the paper's)
    out = model(input_ids, attention_mask=mask, task_ids=t)
"""

from ._version import __version__
from .backends import BackendUnavailableError, registered_backends, resolve_backend
from .integration import (
    add_tasks,
    collect_pooled,
    config,
    inject,
    is_injected,
    moe_layers,
    pooled_outputs,
    set_backend,
    set_trainable,
    use_tasks,
)
from .freeze import freeze_task, frozen_tasks, unfreeze_task
from .io import load, save
from .layer import FusedMoELoRALinear
from .mlp import FusedMoELoRAMLP
from .ops import moe_lora_linear, moe_lora_mlp, moe_lora_mlp_reference, moe_lora_reference
from .peft_compat import disable_adapters, merge_and_unload, print_trainable_parameters, unload
from .peft_import import import_peft_lora
from .routing import Routing, RoutingError, build_routing

__all__ = [
    "__version__",
    "FusedMoELoRALinear",
    "FusedMoELoRAMLP",
    "inject",
    "use_tasks",
    "set_trainable",
    "set_backend",
    "add_tasks",
    "freeze_task",
    "unfreeze_task",
    "frozen_tasks",
    "moe_layers",
    "collect_pooled",
    "pooled_outputs",
    "config",
    "is_injected",
    "import_peft_lora",
    "print_trainable_parameters",
    "disable_adapters",
    "unload",
    "merge_and_unload",
    "save",
    "load",
    "moe_lora_linear",
    "moe_lora_reference",
    "moe_lora_mlp",
    "moe_lora_mlp_reference",
    "build_routing",
    "Routing",
    "RoutingError",
    "BackendUnavailableError",
    "registered_backends",
    "resolve_backend",
]

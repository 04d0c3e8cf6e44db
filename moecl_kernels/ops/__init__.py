"""The fused MoE-LoRA op: schema + autograd (``op``), the float64 oracle (``reference``)
and the seeded dropout shared by all backends (``dropout``)."""

from .dropout import apply_dropout, dropout_mask
from .op import moe_lora_linear, validate
from .reference import moe_lora_reference, pooled_shared_reference

__all__ = ["moe_lora_linear", "validate", "moe_lora_reference", "pooled_shared_reference", "apply_dropout", "dropout_mask"]

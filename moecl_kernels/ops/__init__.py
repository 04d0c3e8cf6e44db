"""The fused ops: the custom-op schemas, fakes and autograd (``custom_ops``), the validated
Python entry point (``linear``) and the pooled shared path (``pooling``). The reference
formula and the dropout hash live in ``moecl_kernels.contract``."""

from ..contract import apply_dropout, dropout_mask, moe_lora_reference, pooled_shared_reference
from .linear import moe_lora_linear, validate

__all__ = ["moe_lora_linear", "validate", "moe_lora_reference", "pooled_shared_reference", "apply_dropout", "dropout_mask"]

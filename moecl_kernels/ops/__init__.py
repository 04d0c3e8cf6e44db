"""The fused ops: the custom-op schemas, fakes and autograd (``custom_ops``), the validated
Python entry points (``linear``: the linear op; ``ffn``: the FFN-level op) and the pooled
shared path (``pooling``). The reference formulas and the dropout hash live in
``moecl_kernels.contract``."""

from ..contract import apply_dropout, dropout_mask, moe_lora_reference, pooled_shared_reference
from ..contract.ffn_reference import moe_lora_mlp_reference
from .ffn import moe_lora_mlp
from .linear import moe_lora_linear, validate

__all__ = ["moe_lora_linear", "moe_lora_mlp", "validate", "moe_lora_reference", "moe_lora_mlp_reference",
           "pooled_shared_reference", "apply_dropout", "dropout_mask"]

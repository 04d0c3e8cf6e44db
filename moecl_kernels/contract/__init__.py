"""The contract shared by every backend of the fused op and by everything above them:
the op's arguments and saved tensors (``args``), the seeded dropout hash (``dropout``) and
the float64 reference formula (``reference``). It imports nothing else of the package."""

from .args import (GRADS, NEEDS, SAVED, SINGLE_MIXED, SINGLE_NONE, Backend, BwdArgs, FwdArgs, OpOptions, acc_dtype,
                   coefficients, host_offsets)
from .dropout import apply_dropout, dropout_mask, dropout_scale
from .reference import moe_lora_reference, pooled_shared_reference

__all__ = [
    "GRADS", "NEEDS", "SAVED", "SINGLE_MIXED", "SINGLE_NONE", "Backend", "BwdArgs", "FwdArgs", "OpOptions",
    "acc_dtype", "coefficients", "host_offsets", "apply_dropout", "dropout_mask", "dropout_scale", "moe_lora_reference",
    "pooled_shared_reference",
]

"""The MLP activations of the FFN-level op (``ffn_args.ACTIVATIONS``) and their derivatives,
in PyTorch: the forward is the very function HF models call (``F.silu``, ``F.gelu``, ...), so
an injected model with zero LoRA B computes bit for bit what the model computed."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .ffn_args import ACTIVATIONS

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_GELU_C = 0.044715


def check_activation(kind: str) -> str:
    if kind not in ACTIVATIONS:
        raise ValueError(f"activation={kind!r} is not supported; supported: {list(ACTIVATIONS)}")
    return kind


def activation(kind: str, t: Tensor) -> Tensor:
    """act(t) for an activation of ``ACTIVATIONS``."""
    if kind == "silu":
        return F.silu(t)
    if kind == "gelu":
        return F.gelu(t)
    if kind == "gelu_tanh":
        return F.gelu(t, approximate="tanh")
    if kind == "relu":
        return F.relu(t)
    raise ValueError(f"activation={kind!r} is not supported; supported: {list(ACTIVATIONS)}")


def activation_grad(kind: str, t: Tensor) -> Tensor:
    """act'(t), elementwise, in t's dtype."""
    if kind == "silu":
        s = torch.sigmoid(t)
        return s * (1.0 + t * (1.0 - s))
    if kind == "gelu":
        return 0.5 * (1.0 + torch.erf(t * (1.0 / math.sqrt(2.0)))) + t * torch.exp(-0.5 * t * t) / math.sqrt(2 * math.pi)
    if kind == "gelu_tanh":
        th = torch.tanh(_SQRT_2_OVER_PI * (t + _GELU_C * t * t * t))
        return 0.5 * (1.0 + th) + 0.5 * t * (1.0 - th * th) * _SQRT_2_OVER_PI * (1.0 + 3.0 * _GELU_C * t * t)
    if kind == "relu":
        return (t > 0).to(t.dtype)
    raise ValueError(f"activation={kind!r} is not supported; supported: {list(ACTIVATIONS)}")

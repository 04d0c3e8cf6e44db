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


def activation_backward(kind: str, grad: Tensor, t: Tensor) -> Tensor:
    """``grad * act'(t)`` in one fused pass (the kernels PyTorch's own autograd runs for these
    activations); :func:`activation_grad` is the plain formula."""
    if kind == "silu":
        return torch.ops.aten.silu_backward(grad, t)
    if kind == "gelu":
        return torch.ops.aten.gelu_backward(grad, t, approximate="none")
    if kind == "gelu_tanh":
        return torch.ops.aten.gelu_backward(grad, t, approximate="tanh")
    if kind == "relu":
        return torch.where(t > 0, grad, 0)
    raise ValueError(f"activation={kind!r} is not supported; supported: {list(ACTIVATIONS)}")


def activation_(kind: str, t: Tensor) -> Tensor:
    """act(t) in place (the same kernels as :func:`activation`, bit for bit); returns t."""
    if kind == "silu":
        return F.silu(t, inplace=True)
    if kind == "gelu":
        return torch.ops.aten.gelu_(t)
    if kind == "gelu_tanh":
        return torch.ops.aten.gelu_(t, approximate="tanh")
    if kind == "relu":
        return t.relu_()
    raise ValueError(f"activation={kind!r} is not supported; supported: {list(ACTIVATIONS)}")


def activation_backward_(kind: str, grad: Tensor, t: Tensor) -> Tensor:
    """:func:`activation_backward` written into ``grad`` (which it returns)."""
    if kind == "silu":
        return torch.ops.aten.silu_backward.grad_input(grad, t, grad_input=grad)
    if kind in ("gelu", "gelu_tanh"):
        return torch.ops.aten.gelu_backward.grad_input(grad, t, approximate="none" if kind == "gelu" else "tanh",
                                                       grad_input=grad)
    if kind == "relu":
        return grad.masked_fill_(~(t > 0), 0)
    raise ValueError(f"activation={kind!r} is not supported; supported: {list(ACTIVATIONS)}")


def activation_into(kind: str, t: Tensor, out: Tensor) -> Tensor:
    """act(t) written into ``out`` (the same kernels as :func:`activation`, bit for bit)."""
    if kind == "silu":
        return torch.ops.aten.silu.out(t, out=out)
    if kind == "gelu":
        return torch.ops.aten.gelu.out(t, out=out)
    if kind == "gelu_tanh":
        return torch.ops.aten.gelu.out(t, approximate="tanh", out=out)
    if kind == "relu":
        return torch.clamp_min(t, 0, out=out)
    raise ValueError(f"activation={kind!r} is not supported; supported: {list(ACTIVATIONS)}")

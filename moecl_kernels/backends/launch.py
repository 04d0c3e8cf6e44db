"""Launch helpers shared by the kernel backends (``triton`` and ``cuda``).

* :func:`device_guard`: the context every launch runs in. Kernel launchers (Triton's, and
  the CUDA backend's stream lookup) use the *current* device and its current stream; on a
  machine with several GPUs the tensors' device need not be the current one, so launches
  are wrapped in ``torch.cuda.device(x.device)``. CPU tensors (the Triton interpreter in
  tests) need no guard.
* :func:`kernel_seed`: the one conversion of the dropout seed for kernels. The seed stays a
  tensor on x's device and the kernels read it from there (a pointer argument, never a
  host scalar), so a captured CUDA graph replays with whatever the seed tensor holds at
  replay time: a new draw into the same tensor gives a new mask without re-capturing.
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch
from torch import Tensor

from ..contract import FwdArgs


def device_guard(device: torch.device):
    """``torch.cuda.device(device)`` for CUDA tensors, a no-op context otherwise."""
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def kernel_seed(a: FwdArgs) -> Optional[Tensor]:
    """The dropout seed as kernels read it: a 1-element int64 tensor on x's device whose
    first element is the seed (used mod 2**32), or None when dropout is off.

    The op hands the backends the seed on x's device (``moe_lora_linear`` moves it there);
    an int64 contiguous seed on that device -- the layer's -- is passed as is (no copy, no
    launch). Anything else (another integer dtype or device) is converted here, once.
    """
    if a.dropout_p == 0.0:
        return None
    seed = a.seed
    if not isinstance(seed, Tensor):
        raise TypeError(f"the dropout seed must be a tensor (0-dim int64 on x's device), got {type(seed).__name__}")
    if seed.numel() != 1 or seed.is_floating_point() or seed.is_complex() or seed.dtype == torch.bool:
        raise ValueError(f"the dropout seed must be one integer, got a {seed.dtype} tensor of shape {tuple(seed.shape)}")
    if seed.dtype != torch.int64 or seed.device != a.x.device:
        seed = seed.to(device=a.x.device, dtype=torch.int64)
    return seed.reshape(1)

"""The fused ops as PyTorch custom ops, dispatched to a backend by name:

* ``moecl::moe_lora_fwd``  -> (y, h_s, h_t, coef)                          the linear op (§1.1)
* ``moecl::moe_lora_bwd``  -> (dx, dA_s, dB_s, dA, dB, dgate)
* ``moecl::moe_lora_mlp_fwd`` -> (y, g, u, a_s, a_t, z_s, z_t, coef, h_pool, z_pool)   the FFN op (§1.3)
* ``moecl::moe_lora_mlp_bwd`` -> the gradients of ``contract.ffn_args.FFN_GRADS``

Unneeded gradients are empty tensors. Every schema is derived from the contract's dataclasses
(:func:`define_fused_op`): the forward takes the fields of its ``FwdArgs`` then
:class:`OpOptions`; the backward takes ``grad_y`` (and the gradients of the other
differentiable outputs), the same forward fields, the saved tensors, the ``needs_*`` flags and
the options. Every argument list, the saved tensors and the gradient tuple are built by name
from those field lists, never written out. Both ops of a pair have fake (meta)
implementations, so ``torch.compile(fullgraph=True)`` traces them, and the forward has an
autograd formula that calls the backward op.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Callable, Optional

import torch
from torch import Tensor

from .. import backends as _bk
from ..contract import GRADS, NEEDS, SAVED, BwdArgs, FwdArgs, OpOptions, acc_dtype
from ..contract.ffn_args import (FFN_GRAD_INPUTS, FFN_GRADS, FFN_NEEDS, FFN_POOLED, FFN_SAVED, FfnBwdArgs, FfnFwdArgs,
                                 ffn_grad_flag)

_SCHEMA_TYPES = {"Tensor": "Tensor", "Optional[Tensor]": "Tensor?", "int": "int", "float": "float", "bool": "bool",
                 "list[bool]": "bool[]", "str": "str"}
OPT_FIELDS = tuple(f.name for f in fields(OpOptions))
_OPTIONAL = {f.name for dc in (FwdArgs, FfnFwdArgs) for f in fields(dc) if f.default is None}


def call_args(names: tuple, **kw) -> tuple:
    """The positional arguments of an op, by name (``FWD_SCHEMA_ARGS`` / ``BWD_SCHEMA_ARGS``); the
    snapshot fields (frozen tasks) default to None."""
    kw = dict({n: None for n in names if n in _OPTIONAL}, **kw)
    missing = [n for n in names if n not in kw]
    extra = sorted(set(kw) - set(names))
    if missing or extra:
        raise TypeError(f"op arguments: missing {missing}, unexpected {extra}")
    return tuple(kw[n] for n in names)


@dataclass
class FusedOp:
    """A forward/backward custom-op pair derived from a contract (see :func:`define_fused_op`)."""

    fwd: Any                 # the forward custom op
    bwd: Any                 # the backward custom op
    fwd_schema_args: tuple   # its arguments, in order
    bwd_schema_args: tuple


def define_fused_op(
    name: str, fwd_cls: type, bwd_cls: type, saved: tuple, needs: tuple, grads: dict[str, tuple[str, str]],
    fake_outputs: Callable[[dict], tuple], *, diff_outputs: tuple = (), unused_in_backward: tuple = (),
    backend_methods: tuple[str, str] = ("forward", "backward"),
) -> FusedOp:
    """Define ``moecl::<name>_fwd`` and ``moecl::<name>_bwd`` and the forward's autograd.

    ``fwd_cls`` / ``bwd_cls``: the contract's argument dataclasses (``bwd_cls`` adds ``grad_y``,
    the ``saved`` tensors, the ``needs`` flags, ``expert_trainable``, ``deterministic`` and, for
    every name in ``diff_outputs``, ``grad_<name>``). The forward returns ``(y, *saved,
    *diff_outputs)``; ``fake_outputs(kw)`` gives their fakes. ``grads``: gradient name ->
    (the input it is the gradient of, the ``needs_*`` flag that asks for it), in the order the
    backend's backward returns them. ``unused_in_backward``: inputs the backward never reads
    (passed to it as None). ``backend_methods``: the backend's (forward, backward) methods."""
    fwd_fields = tuple(f.name for f in fields(fwd_cls))
    tensor_fields = tuple(f.name for f in fields(fwd_cls) if "Tensor" in str(f.type))
    grad_out = ("grad_y",) + tuple(f"grad_{n}" for n in diff_outputs)
    fwd_args = fwd_fields + OPT_FIELDS
    bwd_args = grad_out + fwd_fields + saved + needs + OPT_FIELDS
    types = {f.name: _SCHEMA_TYPES[str(f.type)] for dc in (fwd_cls, OpOptions) for f in fields(dc)}
    types.update({"grad_y": "Tensor", **{f"grad_{n}": "Tensor?" for n in diff_outputs},
                  **{n: "Tensor" for n in saved}, **{n: "bool" for n in needs}})
    n_out = 1 + len(saved) + len(diff_outputs)
    fwd_method, bwd_method = backend_methods

    def schema(names: tuple, returns: int) -> str:
        return f"({', '.join(f'{types[n]} {n}' for n in names)}) -> ({', '.join(['Tensor'] * returns)})"

    def fwd_impl(*values):
        kw = dict(zip(fwd_args, values))
        a = fwd_cls(**{n: kw[n] for n in fwd_fields})
        b = _bk.backend(kw["backend"])
        if kw.get("task_slot") is not None and not getattr(b, "serves_snapshots", False):
            raise ValueError(f"backend {kw['backend']!r} cannot serve frozen tasks' tokens (task_slot given): "
                             "call the op through moe_lora_linear / moe_lora_mlp, which route them to eager")
        return tuple(getattr(b, fwd_method)(a))

    fwd_op = torch.library.custom_op(f"moecl::{name}_fwd", fwd_impl, mutates_args=(), schema=schema(fwd_args, n_out))
    fwd_op.register_fake(lambda *values: fake_outputs(dict(zip(fwd_args, values))))

    def bwd_impl(*values):
        kw = dict(zip(bwd_args, values))
        opts = OpOptions(**{n: kw[n] for n in OPT_FIELDS})
        a = bwd_cls(**{n: kw[n] for n in fwd_fields + saved + needs + grad_out}, expert_trainable=list(
            opts.expert_trainable) or None, deterministic=opts.deterministic)
        a.grad_y = a.grad_y.contiguous()
        out = getattr(_bk.backend(opts.backend), bwd_method)(a)
        # outputs must not alias each other: a fresh empty tensor for every grad not computed
        return tuple(g if g is not None else kw["x"].new_empty((0,)) for g in out)

    bwd_op = torch.library.custom_op(f"moecl::{name}_bwd", bwd_impl, mutates_args=(),
                                     schema=schema(bwd_args, len(grads)))

    @bwd_op.register_fake
    def _bwd_fake(*values):
        kw = dict(zip(bwd_args, values))
        out = []
        for like, flag in grads.values():
            out.append(torch.empty_like(kw[like]) if kw[flag] and kw[like] is not None else kw["x"].new_empty((0,)))
        return tuple(out)

    def setup_context(ctx, inputs, output):
        kw = dict(zip(fwd_args, inputs))
        ctx.save_for_backward(*(kw[n] for n in tensor_fields), *output[1:1 + len(saved)])
        # the saved outputs are not differentiable, and a gradient nobody sent stays None (autograd
        # would otherwise fill a zero tensor per saved output, [T, d_ff] ones at the FFN level)
        ctx.mark_non_differentiable(*output[1:1 + len(saved)])
        ctx.set_materialize_grads(False)
        ctx.scalars = {n: kw[n] for n in fwd_args if n not in tensor_fields}
        ctx.y_meta = (output[0].shape, output[0].dtype, output[0].device)

    def backward(ctx, grad_y, *more):
        kw = dict(zip(tensor_fields + saved, ctx.saved_tensors), **ctx.scalars)
        n = dict(zip(fwd_args, ctx.needs_input_grad))
        flags = {f: any(n[like] and kw[like] is not None for like, fl in grads.values() if fl == f) for f in needs}
        grads_in = {k: None for k in fwd_args}
        extra = dict(zip(grad_out[1:], more[len(saved):]))
        if not any(flags.values()) or (grad_y is None and all(g is None for g in extra.values())):
            return tuple(grads_in.values())
        if grad_y is None:
            shape, dtype, device = ctx.y_meta
            grad_y = torch.zeros(shape, dtype=dtype, device=device)
        kw.update(flags, grad_y=grad_y, **extra, **{k: None for k in unused_in_backward})
        got = dict(zip(grads, bwd_op(*(kw[k] for k in bwd_args))))
        for g, (like, flag) in grads.items():
            if n[like] and flags[flag]:
                grads_in[like] = got[g]
        return tuple(grads_in.values())

    fwd_op.register_autograd(backward, setup_context=setup_context)
    return FusedOp(fwd_op, bwd_op, fwd_args, bwd_args)


# --------------------------------------------------------------------------- the linear op (§1.1)
def _linear_fake(kw: dict) -> tuple:
    x = kw["x"]
    T, r = x.shape[0], kw["shared_A"].shape[0]
    acc = dict(dtype=acc_dtype(x.dtype), device=x.device)
    return x.new_empty((T, kw["weight"].shape[0])), x.new_empty((T, r), **acc), x.new_empty((T, r), **acc), \
        x.new_empty((T, 2), **acc)


# the input each gradient has the shape of, and the flag that asks for it
_GRAD_LIKE = {"dx": ("x", "needs_dx"), "dA_s": ("shared_A", "needs_shared"), "dB_s": ("shared_B", "needs_shared"),
              "dA": ("task_A", "needs_task"), "dB": ("task_B", "needs_task"), "dgate": ("gate_weight", "needs_gate")}
assert tuple(_GRAD_LIKE) == GRADS

LINEAR_OP = define_fused_op("moe_lora", FwdArgs, BwdArgs, SAVED, NEEDS, _GRAD_LIKE, _linear_fake,
                            unused_in_backward=("bias",))
moe_lora_fwd, moe_lora_bwd = LINEAR_OP.fwd, LINEAR_OP.bwd
FWD_FIELDS = tuple(f.name for f in fields(FwdArgs))
FWD_SCHEMA_ARGS, BWD_SCHEMA_ARGS = LINEAR_OP.fwd_schema_args, LINEAR_OP.bwd_schema_args


# --------------------------------------------------------------------------- the FFN op (§1.3)
def _ffn_fake(kw: dict) -> tuple:
    x = kw["x"]
    T, r = x.shape[0], kw["up_proj_shared_A"].shape[0]
    d_ff, d_out = kw["up_proj_weight"].shape[0], kw["down_proj_weight"].shape[0]
    n_pre = 2 if kw["gate_proj_weight"] is not None else 1
    acc = dict(dtype=acc_dtype(x.dtype), device=x.device)
    pool: Optional[Tensor] = kw["pool"]
    B = pool.shape[0] if pool is not None else 0
    return (x.new_empty((T, d_out)), x.new_empty((T, d_ff) if n_pre == 2 else (0,)), x.new_empty((T, d_ff)),
            x.new_empty((T, n_pre * r), **acc), x.new_empty((T, n_pre * r), **acc), x.new_empty((T, r), **acc),
            x.new_empty((T, r), **acc), x.new_empty((T, 2), **acc),
            x.new_empty((B, d_ff) if B else (0,), **acc), x.new_empty((B, r) if B else (0,), **acc))


MLP_OP = define_fused_op(
    "moe_lora_mlp", FfnFwdArgs, FfnBwdArgs, FFN_SAVED, FFN_NEEDS,
    {g: (n, ffn_grad_flag(n)) for g, n in zip(FFN_GRADS, FFN_GRAD_INPUTS)}, _ffn_fake,
    diff_outputs=FFN_POOLED, unused_in_backward=("down_proj_bias",),  # g and u hold the other biases
    backend_methods=("ffn_forward", "ffn_backward"),
)
moe_lora_mlp_fwd, moe_lora_mlp_bwd = MLP_OP.fwd, MLP_OP.bwd

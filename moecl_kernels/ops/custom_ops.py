"""The fused MoE-LoRA linear as two PyTorch custom ops, dispatched to a backend by name.

* ``moecl::moe_lora_fwd``  -> (y, h_s, h_t, coef)
* ``moecl::moe_lora_bwd``  -> (dx, dA_s, dB_s, dA, dB, dgate); unneeded grads are empty tensors

Their schemas are derived from the contract's dataclasses (``contract.args``): the forward
takes the fields of :class:`FwdArgs` then :class:`OpOptions`; the backward takes
``grad_y``, the same :class:`FwdArgs` fields, the saved tensors, the ``needs_*`` flags and
the options. Every argument list, the saved tensors and the gradient tuple are built by
name from those field lists, never written out. Both ops have fake (meta) implementations,
so ``torch.compile(fullgraph=True)`` traces them, and the forward has an autograd formula
that calls the backward op.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any

import torch
from torch import Tensor

from .. import backends as _bk
from ..contract import GRADS, NEEDS, SAVED, BwdArgs, FwdArgs, OpOptions, acc_dtype

FWD_FIELDS = tuple(f.name for f in fields(FwdArgs))
OPT_FIELDS = tuple(f.name for f in fields(OpOptions))
FWD_SCHEMA_ARGS = FWD_FIELDS + OPT_FIELDS
BWD_SCHEMA_ARGS = ("grad_y",) + FWD_FIELDS + SAVED + NEEDS + OPT_FIELDS
_TENSOR_FIELDS = tuple(f.name for f in fields(FwdArgs) if "Tensor" in str(f.type))

_SCHEMA_TYPES = {"Tensor": "Tensor", "Optional[Tensor]": "Tensor?", "int": "int", "float": "float", "bool": "bool",
                 "list[bool]": "bool[]", "str": "str"}
_EXTRA_TYPES = {"grad_y": "Tensor", **{n: "Tensor" for n in SAVED}, **{n: "bool" for n in NEEDS}}
_TYPES = {f.name: _SCHEMA_TYPES[str(f.type)] for dc in (FwdArgs, OpOptions) for f in fields(dc)} | _EXTRA_TYPES


def _schema(names: tuple, returns: int) -> str:
    args = ", ".join(f"{_TYPES[n]} {n}" for n in names)
    return f"({args}) -> ({', '.join(['Tensor'] * returns)})"


def _split(names: tuple, values: tuple) -> dict[str, Any]:
    return dict(zip(names, values))


def call_args(names: tuple, **kw) -> tuple:
    """The positional arguments of an op, by name (``FWD_SCHEMA_ARGS`` / ``BWD_SCHEMA_ARGS``)."""
    missing = [n for n in names if n not in kw]
    extra = sorted(set(kw) - set(names))
    if missing or extra:
        raise TypeError(f"op arguments: missing {missing}, unexpected {extra}")
    return tuple(kw[n] for n in names)


def _fwd_args(kw: dict) -> FwdArgs:
    return FwdArgs(**{n: kw[n] for n in FWD_FIELDS})


def _options(kw: dict) -> OpOptions:
    return OpOptions(**{n: kw[n] for n in OPT_FIELDS})


# --------------------------------------------------------------------------- forward
def _fwd_impl(*values):
    kw = _split(FWD_SCHEMA_ARGS, values)
    y, h_s, h_t, coef = _bk.backend(kw["backend"]).forward(_fwd_args(kw))
    return y, h_s, h_t, coef


moe_lora_fwd = torch.library.custom_op("moecl::moe_lora_fwd", _fwd_impl, mutates_args=(),
                                       schema=_schema(FWD_SCHEMA_ARGS, 4))


@moe_lora_fwd.register_fake
def _fwd_fake(*values):
    kw = _split(FWD_SCHEMA_ARGS, values)
    x = kw["x"]
    T, r = x.shape[0], kw["shared_A"].shape[0]
    acc = dict(dtype=acc_dtype(x.dtype), device=x.device)
    return x.new_empty((T, kw["weight"].shape[0])), x.new_empty((T, r), **acc), x.new_empty((T, r), **acc), \
        x.new_empty((T, 2), **acc)


# --------------------------------------------------------------------------- backward
def _bwd_impl(*values):
    kw = _split(BWD_SCHEMA_ARGS, values)
    opts = _options(kw)
    a = BwdArgs(**{n: kw[n] for n in FWD_FIELDS}, grad_y=kw["grad_y"].contiguous(),
                **{n: kw[n] for n in SAVED + NEEDS},
                expert_trainable=list(opts.expert_trainable) or None, deterministic=opts.deterministic)
    grads = _bk.backend(opts.backend).backward(a)
    # outputs must not alias each other: a fresh empty tensor for every grad not computed
    return tuple(g if g is not None else kw["x"].new_empty((0,)) for g in grads)


moe_lora_bwd = torch.library.custom_op("moecl::moe_lora_bwd", _bwd_impl, mutates_args=(),
                                       schema=_schema(BWD_SCHEMA_ARGS, len(GRADS)))

# the input each gradient has the shape of, and the flag that asks for it
_GRAD_LIKE = {"dx": ("x", "needs_dx"), "dA_s": ("shared_A", "needs_shared"), "dB_s": ("shared_B", "needs_shared"),
              "dA": ("task_A", "needs_task"), "dB": ("task_B", "needs_task"), "dgate": ("gate_weight", "needs_gate")}


@moe_lora_bwd.register_fake
def _bwd_fake(*values):
    kw = _split(BWD_SCHEMA_ARGS, values)
    out = []
    for g in GRADS:
        like, flag = _GRAD_LIKE[g]
        needed = kw[flag] and kw[like] is not None
        out.append(torch.empty_like(kw[like]) if needed else kw["x"].new_empty((0,)))
    return tuple(out)


# --------------------------------------------------------------------------- autograd
def _setup_context(ctx, inputs, output):
    kw = _split(FWD_SCHEMA_ARGS, inputs)
    ctx.save_for_backward(*(kw[n] for n in _TENSOR_FIELDS), *output[1:])
    ctx.scalars = {n: kw[n] for n in FWD_SCHEMA_ARGS if n not in _TENSOR_FIELDS}


def _backward(ctx, grad_y, *_saved_grads):
    saved = ctx.saved_tensors
    kw = dict(zip(_TENSOR_FIELDS + SAVED, saved), **ctx.scalars)
    n = dict(zip(FWD_SCHEMA_ARGS, ctx.needs_input_grad))
    needs = {"needs_dx": n["x"], "needs_shared": n["shared_A"] or n["shared_B"],
             "needs_task": n["task_A"] or n["task_B"], "needs_gate": n["gate_weight"] and kw["gate_weight"] is not None}
    grads_in = {name: None for name in FWD_SCHEMA_ARGS}
    if grad_y is None or not any(needs.values()):
        return tuple(grads_in.values())
    kw.update(needs, grad_y=grad_y, bias=None)  # the backward never reads the bias
    got = dict(zip(GRADS, moe_lora_bwd(*(kw[name] for name in BWD_SCHEMA_ARGS))))
    for g in GRADS:
        like, flag = _GRAD_LIKE[g]
        if n[like] and needs[flag]:
            grads_in[like] = got[g]
    return tuple(grads_in.values())


moe_lora_fwd.register_autograd(_backward, setup_context=_setup_context)

"""The fused MoE-LoRA linear as PyTorch custom ops.

Two ops, one schema each, dispatched to a backend by name (``backend`` argument):

* ``moecl::moe_lora_fwd``  -> (y, h_s, h_t, coef)
* ``moecl::moe_lora_bwd``  -> (dx, dA_s, dB_s, dA, dB, dgate); unneeded grads are empty tensors

Both have fake (meta) implementations so ``torch.compile(fullgraph=True)`` traces
them, and ``moe_lora_fwd`` has an autograd formula that calls ``moe_lora_bwd``.
:func:`moe_lora_linear` is the Python entry point: it validates every argument
(errors name the argument), resolves the backend and returns ``y``.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import backends as _bk
from ..backends.base import BwdArgs, FwdArgs, acc_dtype
from ..routing import Routing

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _fwd_args(
    x, weight, bias, shared_A, shared_B, task_A, task_B, gate_weight, token_task, sorted_idx,
    expert_offsets, offsets_cpu, single_task, scale, dropout_p, seed,
) -> FwdArgs:
    return FwdArgs(
        x=x, weight=weight, bias=bias, shared_A=shared_A, shared_B=shared_B, task_A=task_A, task_B=task_B,
        gate_weight=gate_weight, token_task=token_task, sorted_idx=sorted_idx, expert_offsets=expert_offsets,
        offsets_cpu=offsets_cpu, single_task=single_task, scale=scale, dropout_p=dropout_p, seed=seed,
    )


@torch.library.custom_op("moecl::moe_lora_fwd", mutates_args=())
def moe_lora_fwd(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    shared_A: Tensor,
    shared_B: Tensor,
    task_A: Tensor,
    task_B: Tensor,
    gate_weight: Optional[Tensor],
    token_task: Tensor,
    sorted_idx: Tensor,
    expert_offsets: Tensor,
    offsets_cpu: Optional[Tensor],
    single_task: int,
    scale: float,
    dropout_p: float,
    seed: Optional[Tensor],
    expert_trainable: list[bool],
    deterministic: bool,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    a = _fwd_args(x, weight, bias, shared_A, shared_B, task_A, task_B, gate_weight, token_task, sorted_idx,
                  expert_offsets, offsets_cpu, single_task, scale, dropout_p, seed)
    y, h_s, h_t, coef = _bk.backend(backend).forward(a)
    return y, h_s, h_t, coef


@moe_lora_fwd.register_fake
def _(x, weight, bias, shared_A, shared_B, task_A, task_B, gate_weight, token_task, sorted_idx, expert_offsets,
      offsets_cpu, single_task, scale, dropout_p, seed, expert_trainable, deterministic, backend):
    T, r = x.shape[0], shared_A.shape[0]
    y = x.new_empty((T, weight.shape[0]))
    acc = dict(dtype=acc_dtype(x.dtype), device=x.device)
    return y, x.new_empty((T, r), **acc), x.new_empty((T, r), **acc), x.new_empty((T, 2), **acc)


@torch.library.custom_op("moecl::moe_lora_bwd", mutates_args=())
def moe_lora_bwd(
    grad_y: Tensor,
    x: Tensor,
    weight: Tensor,
    shared_A: Tensor,
    shared_B: Tensor,
    task_A: Tensor,
    task_B: Tensor,
    gate_weight: Optional[Tensor],
    token_task: Tensor,
    sorted_idx: Tensor,
    expert_offsets: Tensor,
    offsets_cpu: Optional[Tensor],
    single_task: int,
    h_s: Tensor,
    h_t: Tensor,
    coef: Tensor,
    scale: float,
    dropout_p: float,
    seed: Optional[Tensor],
    needs: list[bool],
    expert_trainable: list[bool],
    deterministic: bool,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    fa = _fwd_args(x, weight, None, shared_A, shared_B, task_A, task_B, gate_weight, token_task, sorted_idx,
                   expert_offsets, offsets_cpu, single_task, scale, dropout_p, seed)
    a = BwdArgs(**fa.__dict__, grad_y=grad_y.contiguous(), h_s=h_s, h_t=h_t, coef=coef,
                needs_dx=needs[0], needs_shared=needs[1], needs_task=needs[2], needs_gate=needs[3],
                expert_trainable=list(expert_trainable) if len(expert_trainable) else None,
                deterministic=deterministic)
    b = _bk.backend(backend)
    grads = b.backward(a)
    # outputs must not alias each other: a fresh empty tensor for every grad not computed
    return tuple(g if g is not None else x.new_empty((0,)) for g in grads)  # type: ignore[return-value]


@moe_lora_bwd.register_fake
def _(grad_y, x, weight, shared_A, shared_B, task_A, task_B, gate_weight, token_task, sorted_idx, expert_offsets,
      offsets_cpu, single_task, h_s, h_t, coef, scale, dropout_p, seed, needs, expert_trainable, deterministic,
      backend):
    def out(like, needed):
        return torch.empty_like(like) if needed else x.new_empty((0,))

    return (
        out(x, needs[0]), out(shared_A, needs[1]), out(shared_B, needs[1]), out(task_A, needs[2]),
        out(task_B, needs[2]), out(gate_weight, needs[3] and gate_weight is not None),
    )


def _setup_context(ctx, inputs, output):
    (x, weight, bias, shared_A, shared_B, task_A, task_B, gate_weight, token_task, sorted_idx, expert_offsets,
     offsets_cpu, single_task, scale, dropout_p, seed, expert_trainable, deterministic, backend) = inputs
    _, h_s, h_t, coef = output
    ctx.save_for_backward(x, weight, shared_A, shared_B, task_A, task_B, gate_weight, token_task, sorted_idx,
                          expert_offsets, offsets_cpu, seed, h_s, h_t, coef)
    ctx.single_task = single_task
    ctx.scale = scale
    ctx.dropout_p = dropout_p
    ctx.expert_trainable = expert_trainable
    ctx.deterministic = deterministic
    ctx.backend = backend


def _backward(ctx, grad_y, _gh_s, _gh_t, _gcoef):
    (x, weight, shared_A, shared_B, task_A, task_B, gate_weight, token_task, sorted_idx, expert_offsets,
     offsets_cpu, seed, h_s, h_t, coef) = ctx.saved_tensors
    n = ctx.needs_input_grad
    need_dx, need_shared = n[0], (n[3] or n[4])
    need_task, need_gate = (n[5] or n[6]), (n[7] and gate_weight is not None)
    none = (None,) * 19
    if grad_y is None or not (need_dx or need_shared or need_task or need_gate):
        return none
    dx, dAs, dBs, dA, dB, dg = moe_lora_bwd(
        grad_y, x, weight, shared_A, shared_B, task_A, task_B, gate_weight, token_task, sorted_idx,
        expert_offsets, offsets_cpu, ctx.single_task, h_s, h_t, coef, ctx.scale, ctx.dropout_p, seed,
        [need_dx, need_shared, need_task, need_gate], ctx.expert_trainable, ctx.deterministic, ctx.backend,
    )
    return (
        dx if need_dx else None, None, None,
        dAs if n[3] else None, dBs if n[4] else None,
        dA if n[5] else None, dB if n[6] else None,
        dg if need_gate else None,
    ) + (None,) * 11


moe_lora_fwd.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------
# validation and the Python entry point


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


def _describe(t) -> str:
    return f"a {t.dtype} tensor of shape {tuple(t.shape)}" if isinstance(t, Tensor) else type(t).__name__


def _all_valid(x, weight, bias, shared_A, shared_B, task_A, task_B, gate_weight, routing, dropout_p) -> bool:
    """Every check of :func:`validate` as one cheap expression, no message built (the per-call
    host cost of decoding); False sends the call through the checks that name what is wrong."""
    try:
        if not (type(x) is Tensor and x.dim() == 2 and x.dtype in _FLOAT_DTYPES):
            return False
        (T, d_in), d_out, r, E = x.shape, weight.shape[0], shared_A.shape[0], task_A.shape[0]
        dt, dev = x.dtype, x.device
        for t in (weight, bias, shared_A, shared_B, task_A, task_B, gate_weight):
            if t is not None and (t.dtype != dt or t.device != dev):
                return False
        return (r >= 1 and weight.shape == (d_out, d_in) and shared_A.shape == (r, d_in)
                and shared_B.shape == (d_out, r) and task_A.shape == (E, r, d_in) and task_B.shape == (E, d_out, r)
                and (bias is None or bias.shape == (d_out,)) and (gate_weight is None or gate_weight.shape == (2, d_in))
                and routing.num_tokens == T and routing.num_tasks == E and routing.token_task.device == dev
                and 0.0 <= dropout_p < 1.0)
    except Exception:  # not tensors, say: the checks below say what
        return False


def validate(
    x: Tensor, weight: Tensor, bias: Optional[Tensor], shared_A: Tensor, shared_B: Tensor, task_A: Tensor,
    task_B: Tensor, gate_weight: Optional[Tensor], routing: Routing, dropout_p: float,
) -> None:
    """Shape/dtype/device checks; every error names the offending argument."""
    if _all_valid(x, weight, bias, shared_A, shared_B, task_A, task_B, gate_weight, routing, dropout_p):
        return
    _check(isinstance(x, Tensor) and x.dim() == 2, f"x must be a 2-D [tokens, d_in] tensor, got shape {tuple(getattr(x, 'shape', ()))}")
    _check(x.dtype in _FLOAT_DTYPES, f"x has dtype {x.dtype}; supported: fp16, bf16, fp32, fp64")
    T, d_in = x.shape
    _check(weight.dim() == 2 and weight.shape[1] == d_in,
           f"weight must be [d_out, d_in={d_in}], got {tuple(weight.shape)}")
    d_out = weight.shape[0]
    _check(shared_A.dim() == 2 and shared_A.shape[1] == d_in,
           f"shared_A must be [r, d_in={d_in}], got {tuple(shared_A.shape)}")
    r = shared_A.shape[0]
    _check(r >= 1, "shared_A has rank 0; r must be >= 1")
    _check(tuple(shared_B.shape) == (d_out, r), f"shared_B must be [d_out={d_out}, r={r}], got {tuple(shared_B.shape)}")
    _check(task_A.dim() == 3 and task_A.shape[1:] == (r, d_in),
           f"task_A must be [E, r={r}, d_in={d_in}], got {tuple(task_A.shape)}")
    E = task_A.shape[0]
    _check(tuple(task_B.shape) == (E, d_out, r), f"task_B must be [E={E}, d_out={d_out}, r={r}], got {tuple(task_B.shape)}")
    if bias is not None:
        _check(tuple(bias.shape) == (d_out,), f"bias must be [d_out={d_out}], got {tuple(bias.shape)}")
    if gate_weight is not None:
        _check(tuple(gate_weight.shape) == (2, d_in), f"gate_weight must be [2, d_in={d_in}], got {tuple(gate_weight.shape)}")
    named = [("weight", weight), ("bias", bias), ("shared_A", shared_A), ("shared_B", shared_B),
             ("task_A", task_A), ("task_B", task_B), ("gate_weight", gate_weight)]
    for name, t in named:
        if t is None:
            continue
        _check(t.dtype == x.dtype, f"{name} has dtype {t.dtype} but x has {x.dtype}; cast them to one dtype")
        _check(t.device == x.device, f"{name} is on {t.device} but x is on {x.device}")
    _check(routing.num_tokens == T,
           f"routing covers {routing.num_tokens} tokens but x has {T}: build it for this input (task_ids)")
    _check(routing.num_tasks == E, f"routing was built for num_tasks={routing.num_tasks} but task_A has E={E} experts")
    _check(routing.token_task.device == x.device,
           f"routing tensors are on {routing.token_task.device} but x is on {x.device}")
    _check(0.0 <= dropout_p < 1.0, f"dropout_p must be in [0, 1), got {dropout_p}")


def _needs_custom_op(x: Tensor, *params: Optional[Tensor]) -> bool:
    """The call must go through ``moecl::moe_lora_fwd``: autograd will differentiate it, a
    compiler or a dispatch mode (fake tensors, FlopCounterMode, ...) is watching, or x is a
    tensor subclass."""
    if type(x) is not Tensor or torch.compiler.is_compiling() or _dispatch_mode_active():
        return True
    return torch.is_grad_enabled() and (x.requires_grad or any(p is not None and p.requires_grad for p in params))


def _dispatch_mode_active() -> bool:
    from torch.utils._python_dispatch import _get_current_dispatch_mode

    return _get_current_dispatch_mode() is not None


def moe_lora_linear(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    shared_A: Tensor,
    shared_B: Tensor,
    task_A: Tensor,
    task_B: Tensor,
    gate_weight: Optional[Tensor],
    routing: Routing,
    *,
    scale: float,
    dropout_p: float = 0.0,
    seed: Optional[Tensor] = None,
    expert_trainable: Optional[list[bool]] = None,
    deterministic: bool = False,
    backend: Optional[str] = None,
) -> Tensor:
    """y = x W^T + b + gated shared LoRA + gated routed task LoRA (SPEC §1), for x [T, d_in]."""
    validate(x, weight, bias, shared_A, shared_B, task_A, task_B, gate_weight, routing, dropout_p)
    if dropout_p > 0.0:
        _check(seed is not None, "seed is required when dropout_p > 0 (a 0-dim int64 tensor on x's device)")
        _check(isinstance(seed, Tensor) and seed.numel() == 1 and not seed.is_floating_point()
               and not seed.is_complex() and seed.dtype != torch.bool,
               f"seed must be a 0-dim integer tensor (int64, on x's device), got {_describe(seed)}")
        if seed.device != x.device:  # a host seed costs a copy per call; draw it on x's device instead
            seed = seed.to(x.device)
    name = _bk.choose_backend(backend, x, shared_A.shape[0], task_A.shape[0])
    if not _needs_custom_op(x, weight, bias, shared_A, shared_B, task_A, task_B, gate_weight):
        # eager inference (decode): nothing to differentiate, nothing to trace -- call the
        # backend directly and skip the custom op's dispatch (tens of microseconds a call)
        y, _, _, _ = _bk.backend(name).forward(_fwd_args(
            x, weight, bias, shared_A, shared_B, task_A, task_B, gate_weight, routing.token_task,
            routing.sorted_idx, routing.expert_offsets, routing.offsets_cpu, routing.single_task, float(scale),
            float(dropout_p), seed if dropout_p > 0.0 else None))
        return y
    y, _, _, _ = moe_lora_fwd(
        x, weight, bias, shared_A, shared_B, task_A, task_B, gate_weight,
        routing.token_task, routing.sorted_idx, routing.expert_offsets, routing.offsets_cpu, routing.single_task,
        float(scale), float(dropout_p), seed if dropout_p > 0.0 else None,
        list(expert_trainable) if expert_trainable is not None else [], bool(deterministic), name,
    )
    return y

"""The contract of the FFN-level op (docs/spec.md §1.3): its arguments (whose field order *is*
the custom ops' schema order, see ``ops.custom_ops``), the saved tensors and the activations.

Semantics, for token i with task ``t_i`` (-1 = no task), projections p in {gate, up, down}
(a plain two-layer MLP has no gate projection) and experts e in {s (shared), t (= t_i)}:

    coef_i  = as in the linear op (``contract.args``): [beta_s, beta_t] with a gate and a task,
              [1, 1] without a gate, [1, 0] without a task
    x~      = dropout(x)                                     (one mask for the gate and up LoRAs)
    a_{p,e} = x~ A_{p,e}^T                                   [r]  (p = gate, up)
    g, u    = x W_gate^T + b_gate,  x W_up^T + b_up          the base pre-activations, run once
    pg_e    = g + s a_{gate,e} B_{gate,e}^T,   pu_e = u + s a_{up,e} B_{up,e}^T
    h_e     = act(pg_e) * pu_e                               (plain MLP: act(pu_e))
    h       = h_s + c_t (h_t - h_s)                          (= c_s h_s + c_t h_t: c_s + c_t = 1)
    z_e     = h~_e A_{down,e}^T                              h~ = dropout with the down mask
    y       = h W_down^T + b_down + s c_s z_s B_{down,s}^T + s c_t z_t B_{down,t}^T

    so y = c_s FFN_s(x) + c_t FFN_t(x), FFN_e the whole MLP with expert e's LoRA on its three
    projections, and y = FFN_s(x) for a token without a task.

Without a gate (``moe_gate`` None) both experts' LoRA terms are added to the *same* FFN, as the
linear op does: pg = g + s a_{gate,s} B_{gate,s}^T + s a_{gate,t} B_{gate,t}^T (likewise pu),
h = act(pg) * pu, z_e = h~ A_{down,e}^T, y as above with coef [1, 1] -- exactly what three
ungated linear ops compute.

The down LoRA's input mask is the seeded hash of ``contract.dropout`` with the seed
``seed ^ DOWN_SEED_XOR`` over (token, d_ff column): independent of x's mask, regenerated in the
backward. One mask serves h_s and h_t (as one x~ serves both experts in the linear op).

Forward returns ``(y, g, u, a_s, a_t, z_s, z_t, coef, h_pool, z_pool)``: y, g, u in x's dtype
(g empty [0] for a plain MLP); ``a_s = [a_{gate,s} | a_{up,s}]`` and ``a_t`` [T, 2r] ([T, r]
for a plain MLP; a_t is 0 without a task), z_s, z_t [T, r], coef [T, 2] in
``acc_dtype(x.dtype)``. These are what the backward consumes: it recomputes h_e from g, u and
the rank-r factors; nothing else of size T x d_ff is saved.

Pooling (``pool`` [B, S] with B * S = T, rows summing to 1, or None): ``h_pool = pool-weighted
sum over each sequence of h_s`` [B, d_ff] and ``z_pool`` [B, r] likewise of z_s, both in the
accumulation dtype, so that the discriminator input ``p_n = masked mean of FFN_s(x) =
h_pool W_down^T + b_down + s z_pool B_{down,s}^T`` costs no T x d GEMM (docs/spec.md §1.3);
both are differentiable (the backward takes their gradients). Without ``pool`` they are
empty [0]. Pooling needs a gate (without one FFN_s is not evaluated); ``ops.ffn`` checks it.

Frozen tasks (``mk.freeze_task``): ``<proj>_snap_shared_A`` [F, r, d_in_p], ``<proj>_snap_shared_B``
[F, d_out_p, r], ``snap_gate`` [F, 2, d] and ``task_slot`` / ``task_slot_cpu`` as in the linear op
(``contract.args``): a token of a task in slot f uses slot f's shared expert (all projections) and
gate; FFN_s, a_s, z_s, coef and the pooled outputs are then of the snapshot. Snapshots get no gradient.

Backward returns the gradients named in ``FFN_GRADS`` (``d<field>``); unneeded ones are None.
Frozen task experts get zeros and cost no compute, as in the linear op.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from torch import Tensor

# The activations HF models use in their MLPs: SiLU (Llama, Qwen2, Mistral), exact GELU (BERT),
# tanh-approximated GELU (Gemma; gelu_new / gelu_pytorch_tanh), ReLU (OPT, T5 v1.0).
ACTIVATIONS = ("silu", "gelu", "gelu_tanh", "relu")

DOWN_SEED_XOR = 0x2545F491  # the down LoRA's dropout mask: the hash with seed ^ DOWN_SEED_XOR

PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
LORA_PARTS = ("shared_A", "shared_B", "task_A", "task_B")


@dataclass
class FfnFwdArgs:
    x: Tensor                              # [T, d]
    gate_proj_weight: Optional[Tensor]     # [d_ff, d]; None: a plain two-layer MLP
    gate_proj_bias: Optional[Tensor]       # [d_ff]
    up_proj_weight: Tensor                 # [d_ff, d]
    up_proj_bias: Optional[Tensor]         # [d_ff]
    down_proj_weight: Tensor               # [d_out, d_ff]
    down_proj_bias: Optional[Tensor]       # [d_out]
    gate_proj_shared_A: Optional[Tensor]   # [r, d]
    gate_proj_shared_B: Optional[Tensor]   # [d_ff, r]
    gate_proj_task_A: Optional[Tensor]     # [E, r, d]
    gate_proj_task_B: Optional[Tensor]     # [E, d_ff, r]
    up_proj_shared_A: Tensor               # [r, d]
    up_proj_shared_B: Tensor               # [d_ff, r]
    up_proj_task_A: Tensor                 # [E, r, d]
    up_proj_task_B: Tensor                 # [E, d_ff, r]
    down_proj_shared_A: Tensor             # [r, d_ff]
    down_proj_shared_B: Tensor             # [d_out, r]
    down_proj_task_A: Tensor               # [E, r, d_ff]
    down_proj_task_B: Tensor               # [E, d_out, r]
    moe_gate: Optional[Tensor]             # [2, d] or None (no gate)
    token_task: Tensor                     # routing tensors: as in ``contract.args``
    sorted_idx: Tensor
    expert_offsets: Tensor
    offsets_cpu: Optional[Tensor]
    single_task: int
    pool: Optional[Tensor]                 # [B, S] pooling weights in acc_dtype (B * S = T), or None
    activation: str                        # one of ACTIVATIONS
    scale: float
    dropout_p: float
    seed: Optional[Tensor]                 # 0-d int64, or None without dropout
    gate_proj_snap_shared_A: Optional[Tensor] = None   # [F, r, d]   (frozen tasks: see the module docstring)
    gate_proj_snap_shared_B: Optional[Tensor] = None   # [F, d_ff, r]
    up_proj_snap_shared_A: Optional[Tensor] = None     # [F, r, d]
    up_proj_snap_shared_B: Optional[Tensor] = None     # [F, d_ff, r]
    down_proj_snap_shared_A: Optional[Tensor] = None   # [F, r, d_ff]
    down_proj_snap_shared_B: Optional[Tensor] = None   # [F, d_out, r]
    snap_gate: Optional[Tensor] = None                 # [F, 2, d]
    task_slot: Optional[Tensor] = None                 # int32 [E], -1 = live
    task_slot_cpu: Optional[Tensor] = None             # int64 [E] on the host

    def snapshots(self, proj: str) -> tuple:
        """(snap_shared_A, snap_shared_B) of projection ``proj``."""
        return getattr(self, f"{proj}_snap_shared_A"), getattr(self, f"{proj}_snap_shared_B")

    @property
    def gated_mlp(self) -> bool:
        """Whether the MLP has a gate projection (Llama style) or is a plain two-layer MLP."""
        return self.gate_proj_weight is not None

    def lora(self, proj: str) -> tuple:
        """(shared_A, shared_B, task_A, task_B) of projection ``proj`` (None for a missing one)."""
        return tuple(getattr(self, f"{proj}_{part}") for part in LORA_PARTS)

    @property
    def rank(self) -> int:
        return self.up_proj_shared_A.shape[0]

    @property
    def num_experts(self) -> int:
        return self.up_proj_task_A.shape[0]


@dataclass
class FfnBwdArgs(FfnFwdArgs):
    grad_y: Tensor = None                  # [T, d_out]
    grad_h_pool: Optional[Tensor] = None   # [B, d_ff] or None
    grad_z_pool: Optional[Tensor] = None   # [B, r] or None
    g: Tensor = None
    u: Tensor = None
    a_s: Tensor = None
    a_t: Tensor = None
    z_s: Tensor = None
    z_t: Tensor = None
    coef: Tensor = None
    needs_dx: bool = True
    needs_shared: bool = True              # the shared expert's A and B of every projection
    needs_task: bool = True                # the trainable task experts' A and B of every projection
    needs_gate: bool = True                # moe_gate
    expert_trainable: Optional[list] = None
    deterministic: bool = False

    def trainable(self, e: int) -> bool:
        return self.needs_task and (self.expert_trainable is None or bool(self.expert_trainable[e]))


FFN_SNAPSHOTS = tuple(f"{p}_snap_shared_{m}" for p in PROJECTIONS for m in "AB") + ("snap_gate",)
FFN_SAVED = ("g", "u", "a_s", "a_t", "z_s", "z_t", "coef")  # forward outputs the backward consumes
FFN_POOLED = ("h_pool", "z_pool")  # differentiable forward outputs besides y (empty without pool)
FFN_NEEDS = ("needs_dx", "needs_shared", "needs_task", "needs_gate")
FFN_GRAD_INPUTS = ("x",) + tuple(f"{p}_{part}" for p in PROJECTIONS for part in LORA_PARTS) + ("moe_gate",)
FFN_GRADS = tuple("d" + n for n in FFN_GRAD_INPUTS)  # what a backend's ffn_backward returns, in order


def down_seed(seed):
    """The seed of the down LoRA's dropout mask: ``seed ^ DOWN_SEED_XOR`` (an int, or a 0-d
    integer tensor like ``seed``: no host sync)."""
    return seed ^ DOWN_SEED_XOR


def ffn_grad_flag(name: str) -> str:
    """The ``needs_*`` flag that asks for the gradient of input ``name``."""
    if name == "x":
        return "needs_dx"
    if name == "moe_gate":
        return "needs_gate"
    return "needs_shared" if "_shared_" in name else "needs_task"

"""The continual-learning methods of the harness, all on one injected module (``FusedMoELoRALinear``
or, at the FFN level, ``FusedMoELoRAMLP``).

| method          | experts       | gate | shared expert       | routing (train / test)   | extra loss                    |
| --------------- | ------------- | ---- | ------------------- | ------------------------ | ----------------------------- |
| ``moecl``       | one per task  | yes  | trainable           | task k / task j          | adversarial (discriminators)  |
| ``moecl_nogan`` | one per task  | yes  | trainable           | task k / task j          | none (lambda = 0)             |
| ``seq_lora``    | none          | no   | trainable: the LoRA | -1 / -1 (shared only)    | none                          |
| ``isolated_lora``| one per task | no   | frozen at zero      | task k / task j          | none                          |
| ``olora``       | one per task  | no   | frozen at zero      | task k / -1 (merged)     | orthogonality to earlier A's  |
| ``isolated_lora_rm`` | one per task, rank 2r | no | frozen at zero | task k / task j | none                  |

``isolated_lora_rm`` is the rank-matched baseline: isolated LoRA whose task expert has rank
``2 * model.r`` (and ``lora_alpha = 2 * model.alpha``, so the scale ``alpha / r`` is MoE-CL's), i.e.
the trainable adapter parameters per task of MoE-CL's shared expert plus its task expert
(:func:`trainable_adapter_count`; MoE-CL also trains a ``[2, d_in]`` gate per injected module, which
the rank-matched baseline has no counterpart for: it has ``2 d_in`` parameters per module fewer).
With per-task snapshots (``moecl_snap*``) every task keeps its own copy of the shared expert, so the
fair question is whether MoE-CL beats one isolated LoRA of the same size per task.

The MoE-CL variants are ``moecl`` plus one idea each (``variants.py``; combinations name
every idea they combine):

| variant               | idea                                                                                 |
| --------------------- | ------------------------------------------------------------------------------------ |
| ``moecl_taskgate``    | a snapshot of the gates per task, swapped in to evaluate that task                   |
| ``moecl_taskshared``  | a snapshot of the shared expert per task, swapped in to evaluate that task           |
| ``moecl_dmem``        | the discriminators also see earlier tasks (a memory of pooled inputs, recomputed)    |
| ``moecl_distill``     | the shared path on the task's tokens is distilled against its pre-task snapshot      |
| ``moecl_slr``         | the shared expert's learning rate is scaled (``method.shared_lr_scale``) after task 1 |
| ``moecl_warm``        | a new task's expert starts as a copy of the shared expert (from task 2 on)            |
| ``moecl_snap``        | taskgate + taskshared: everything task j's path uses is frozen with task j            |
| ``moecl_snap_dmem``   | snap + dmem                                                                           |
| ``moecl_snap_warm``   | snap + warm                                                                           |
| ``moecl_snap_nogan``  | snap without the adversarial term (lambda = 0, as ``moecl_nogan``)                    |

O-LoRA (Wang et al. 2023): the LoRA of task k is trained with ``lambda_orth *
sum_{j<k} |A_k A_j^T|_1`` against the frozen A's of earlier tasks; after the task it
is merged into the base weight, so at test time every task runs on the sum of all
LoRAs without a task id. The merge is recomputed from the saved experts on resume.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
from torch import Tensor

import moecl_kernels as mk

from .parallel import reshard


@dataclass(frozen=True)
class MethodSpec:
    name: str
    task_experts: bool  # one expert per task (else a single shared LoRA)
    gate: bool
    shared: bool  # the shared expert is trained
    adversarial: bool
    olora: bool = False
    task_gate: bool = False  # a snapshot of the gates per task, swapped in to evaluate that task
    task_shared: bool = False  # a snapshot of the shared expert per task, swapped in to evaluate that task
    disc_memory: bool = False  # earlier tasks' pooled inputs join the discriminator loss
    distill: bool = False  # shared path distilled against its pre-task snapshot
    shared_lr: bool = False  # shared expert's lr scaled by method.shared_lr_scale from task 2 on
    warm: bool = False  # a new task's expert starts as a copy of the shared expert (from task 2 on)
    rank_scale: int = 1  # the experts' rank (and alpha) are model.r (model.alpha) times this

    @property
    def linear_only(self) -> bool:
        """The memory and the distillation recompute the shared path from a pooled input, which
        needs it linear in its input: the linear level only (model.level=linear)."""
        return self.disc_memory or self.distill

    def num_experts(self, num_tasks: int) -> int:
        return num_tasks if self.task_experts else 1

    def route(self, task_ids: Tensor, phase: str) -> Tensor:
        """Expert ids for a batch of true task ids; ``phase`` is "train" (training and
        dev checks) or "test" (the accuracy matrix)."""
        if not self.task_experts or (self.olora and phase == "test"):
            return torch.full_like(task_ids, -1)
        return task_ids

    def set_trainable(self, model: nn.Module, task: int) -> None:
        """Only the parameters this method trains on ``task`` require grad (model = the injected backbone)."""
        mk.set_trainable(model, task=task if self.task_experts else None, shared=self.shared, gate=self.gate)


METHODS: dict[str, MethodSpec] = {
    "moecl": MethodSpec("moecl", task_experts=True, gate=True, shared=True, adversarial=True),
    "moecl_nogan": MethodSpec("moecl_nogan", task_experts=True, gate=True, shared=True, adversarial=False),
    "seq_lora": MethodSpec("seq_lora", task_experts=False, gate=False, shared=True, adversarial=False),
    "isolated_lora": MethodSpec("isolated_lora", task_experts=True, gate=False, shared=False, adversarial=False),
    "olora": MethodSpec("olora", task_experts=True, gate=False, shared=False, adversarial=False, olora=True),
    "isolated_lora_rm": MethodSpec("isolated_lora_rm", task_experts=True, gate=False, shared=False, adversarial=False,
                                   rank_scale=2),
}
BASELINES = tuple(METHODS)


def _variant(name: str, **ideas: bool) -> MethodSpec:
    """``moecl`` with ``ideas`` switched on (``adversarial=False`` drops its GAN term instead)."""
    return MethodSpec(name, **{"task_experts": True, "gate": True, "shared": True, "adversarial": True, **ideas})


for _name, _ideas in {
    "moecl_taskgate": dict(task_gate=True),
    "moecl_taskshared": dict(task_shared=True),
    "moecl_dmem": dict(disc_memory=True),
    "moecl_distill": dict(distill=True),
    "moecl_slr": dict(shared_lr=True),
    "moecl_warm": dict(warm=True),
    "moecl_snap": dict(task_gate=True, task_shared=True),
    "moecl_snap_dmem": dict(task_gate=True, task_shared=True, disc_memory=True),
    "moecl_snap_warm": dict(task_gate=True, task_shared=True, warm=True),
    "moecl_snap_nogan": dict(task_gate=True, task_shared=True, adversarial=False),
}.items():
    METHODS[_name] = _variant(_name, **_ideas)


def trainable_adapter_count(model: nn.Module, spec: MethodSpec, task: int) -> int:
    """The adapter parameters (experts and gates of the injected modules; not the heads or the
    discriminators) that ``spec`` trains on ``task``; leaves ``model`` trainable as for ``task``."""
    spec.set_trainable(model, task)
    return sum(p.numel() for layer in mk.moe_layers(model).values() for _, p in layer.adapter_parameters()
               if p.requires_grad)


def orthogonality_loss(model: nn.Module, task: int) -> Tensor:
    """O-LoRA's sum over injected modules and earlier tasks j of |A_task A_j^T|_1."""
    total = None
    projections = [p for layer in mk.moe_layers(model).values() for p in layer.lora_projections()]
    for proj in projections:
        a = proj.lora_task_A[task]
        for j in range(task):
            term = (a @ proj.lora_task_A[j].detach().T).abs().sum()
            total = term if total is None else total + term
    if total is None:
        return projections[0].lora_task_A[task].new_zeros(())
    return total


def merge_expert(model: nn.Module, task: int) -> None:
    """Add expert ``task``'s LoRA, s * B A, into each injected module's (frozen) base weight
    (FSDP-sharded weights included: every process adds its shard of the delta)."""
    for layer in mk.moe_layers(model).values():
        layer.merge_task(task)
    reshard(model)

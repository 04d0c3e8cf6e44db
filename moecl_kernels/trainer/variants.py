"""What the MoE-CL variants (``moecl_*`` methods) add to the paper's method, all in the
trainer, through the public API (``mk.moe_layers`` and each injected module's
``adapter_parameters``), so that the same code serves the linear and the FFN level.

* :class:`FrozenTasks` (``moecl_snap*``: the gates *and* the shared experts): ``mk.freeze_task``
  when a task ends -- the library keeps the task's gate and shared expert as snapshots and the
  op routes the task's tokens to them, so every task is served by its own snapshot in one call,
  mixed batches included (nothing is swapped).
* :class:`TaskSnapshots` (``moecl_taskgate`` / ``moecl_taskshared``: one of the two): a copy of
  the chosen parameters taken when a task ends and swapped in while that task is evaluated
  (evaluation batches hold one task).
* :class:`InputCapture`: forward pre-hooks that keep each injected module's input of the
  current training forward (for the two losses below); nothing is kept in evaluation.
* Discriminator memory: the mask-weighted mean of a module's input over a sequence,
  ``xbar_n``, for a few examples of every finished task. By the pooled-input identity of
  docs/spec.md §1.2 the discriminator's input on them, ``p_n = xbar_n W^T + b + s (xbar_n
  A_s^T) B_s^T``, is recomputed exactly under the *current* shared expert
  (:func:`shared_path_of_pooled`): the discriminators see every finished task's class, and
  no text or token states are stored.
* Shared-path distillation: the shared expert's output on the current task's tokens is
  pulled towards that of its snapshot from before the task (:func:`drift_loss`).
* Warm start: a new task's expert starts as a copy of the shared expert
  (:func:`warm_start_task_expert`), so the task starts from what the shared expert has
  learnt on the earlier tasks, in both experts (at the copy the shared path's share of the
  output goes from ``beta_shared S(x)`` to ``S(x)``: the gate's two weights sum to one).
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

import moecl_kernels as mk


def adapter_group(backbone: nn.Module, kind: str) -> dict[str, nn.Parameter]:
    """The gates (``kind="gate"``) or the shared experts (``kind="shared"``) of every injected
    module, by ``<module>.<parameter>`` name."""
    if kind not in ("gate", "shared"):
        raise ValueError(f"kind must be 'gate' or 'shared', got {kind!r}")
    out = {}
    for lname, layer in mk.moe_layers(backbone).items():
        for pname, p in layer.adapter_parameters():
            leaf = pname.rsplit(".", 1)[-1]
            if (kind == "gate" and leaf == "moe_gate") or (kind == "shared" and leaf.startswith("lora_shared_")):
                out[f"{lname}.{pname}"] = p
    return out


class TaskSnapshots:
    """Per-task copies of ``params``; ``store`` (task -> name -> tensor) is the caller's dict
    (the engine keeps it in its checkpointed state)."""

    def __init__(self, params: dict[str, nn.Parameter], store: dict[int, dict[str, Tensor]]) -> None:
        if not params:
            raise ValueError("no parameters to snapshot (does the model have gates / a shared expert?)")
        self.params = params
        self.store = store

    @torch.no_grad()
    def take(self, task: int) -> None:
        self.store[task] = {n: p.detach().clone() for n, p in self.params.items()}

    @contextlib.contextmanager
    def view(self, task: Optional[int]) -> Iterator[None]:
        """Task ``task``'s snapshot in place of the live values inside the block (the live
        values when the task has none yet: it is the task being trained, or a later one)."""
        snap = self.store.get(task) if task is not None else None
        if snap is None:
            yield
            return
        with torch.no_grad():
            live = {n: p.detach().clone() for n, p in self.params.items()}
            for n, p in self.params.items():
                p.copy_(snap[n].to(p.device))
        try:
            yield
        finally:
            with torch.no_grad():
                for n, p in self.params.items():
                    p.copy_(live[n])


class FrozenTasks:
    """``mk.freeze_task`` at the end of each task. ``store`` is the caller's dict (the engine's
    checkpointed state): it holds the snapshot buffers (``state_dict`` entries), put back into the
    model by :meth:`restore` when a run resumes."""

    def __init__(self, backbone: nn.Module, store: dict[str, Tensor]) -> None:
        self.backbone = backbone
        self.store = store

    def take(self, task: int) -> None:
        mk.freeze_task(self.backbone, task)
        self.store.clear()
        self.store.update({k: v.detach().cpu().clone() for k, v in self.backbone.state_dict().items()
                           if ".moe_snap_" in k})

    def restore(self) -> None:
        if self.store:  # load_state_dict sizes the snapshot buffers from the saved task lists
            missing, unexpected = self.backbone.load_state_dict(self.store, strict=False)
            if unexpected:
                raise ValueError(f"checkpointed snapshots do not fit the model: {unexpected[:5]}")

    def view(self, task: Optional[int]) -> contextlib.AbstractContextManager:
        """Nothing to swap: a frozen task's tokens use its snapshots in the op."""
        return contextlib.nullcontext()


class InputCapture:
    """Keeps the input ``x`` [B, S, d_in] of each module of ``modules`` (name -> injected
    module) seen by the last forward while ``enabled``."""

    def __init__(self, modules: dict[str, nn.Module]) -> None:
        self.enabled = False
        self.inputs: dict[str, Tensor] = {}
        self._handles = [m.register_forward_pre_hook(self._hook(n)) for n, m in modules.items()]

    def _hook(self, name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            if self.enabled and args:
                self.inputs[name] = args[0]
        return hook

    @contextlib.contextmanager
    def capturing(self) -> Iterator[dict[str, Tensor]]:
        self.inputs = {}
        self.enabled = True
        try:
            yield self.inputs
        finally:
            self.enabled = False

    def clear(self) -> None:
        self.inputs = {}

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Mean of x [B, S, d] over each sequence's attended tokens (mask [B, S]): [B, d] in fp32."""
    w = mask.to(torch.float32)
    w = w / w.sum(1, keepdim=True).clamp(min=1.0)
    return torch.bmm(w.unsqueeze(1), x.float()).squeeze(1)


def _linear_level(layer: nn.Module, what: str) -> None:
    if hasattr(layer, "projection"):  # the FFN level: FFN_shared is not linear in its input
        raise NotImplementedError(
            f"{what} needs the linear level (model.level=linear): at the FFN level the shared path FFN_shared(x) "
            "is not linear in x, so it cannot be recomputed from the pooled input")


def shared_path_of_pooled(layer: nn.Module, xbar: Tensor) -> Tensor:
    """p = xbar W^T + b + s (xbar A_s^T) B_s^T [N, d_out] under the layer's current shared
    expert (docs/spec.md §1.2: equal to the pooled shared path of the sequences whose
    pooled input is xbar); differentiable in the shared expert."""
    _linear_level(layer, "the discriminator memory")
    dt = layer.lora_shared_A.dtype
    x = xbar.to(dt)
    bias = layer.bias.to(dt) if layer.bias is not None else None
    return F.linear(x, layer.weight.to(dt), bias) + layer.scaling * F.linear(F.linear(x, layer.lora_shared_A),
                                                                              layer.lora_shared_B)


def input_projections(layer: nn.Module) -> list[nn.Module]:
    """The LoRA projections of an injected module whose input is the module's input: the
    module itself (linear level), or an FFN's gate and up projections (FFN level; the down
    projection's input is inside the fused op)."""
    if hasattr(layer, "projection"):
        return [p for p in (layer.projection("gate"), layer.projection("up")) if p is not None]
    return [layer]


def lora_projections(layer: nn.Module) -> list[nn.Module]:
    """Every projection of an injected module that holds LoRA experts (itself at the linear level)."""
    return list(layer.lora_projections()) if hasattr(layer, "lora_projections") else [layer]


@torch.no_grad()
def warm_start_task_expert(backbone: nn.Module, task: int) -> None:
    """Task expert ``task`` := the shared expert (A and B), in every projection."""
    for layer in mk.moe_layers(backbone).values():
        for proj in lora_projections(layer):
            proj.lora_task_A[task].copy_(proj.lora_shared_A)
            proj.lora_task_B[task].copy_(proj.lora_shared_B)


def shared_reference(layers: dict[str, nn.Module]) -> dict[str, Tensor]:
    """A detached copy of the shared experts (A, B) of every input projection, by name."""
    ref = {}
    for lname, layer in layers.items():
        for i, proj in enumerate(input_projections(layer)):
            ref[f"{lname}/{i}/A"] = proj.lora_shared_A.detach().clone()
            ref[f"{lname}/{i}/B"] = proj.lora_shared_B.detach().clone()
    return ref


def drift_loss(layers: dict[str, nn.Module], inputs: dict[str, Tensor], mask: Tensor,
               reference: dict[str, Tensor]) -> Tensor:
    """Relative drift of the shared path on the current tokens, averaged over projections:
    ``sum_tokens |s x (A_s^T B_s^T - A_0^T B_0^T)|^2 / sum_tokens |s x A_0^T B_0^T|^2`` over the
    attended tokens x of the module's input, (A_0, B_0) the pre-task snapshot."""
    terms = []
    for lname, layer in layers.items():
        if lname not in inputs:
            continue
        x = inputs[lname]
        keep = mask.reshape(-1).bool()
        x2 = x.reshape(-1, x.shape[-1])[keep].float()
        for i, proj in enumerate(input_projections(layer)):
            a0, b0 = reference[f"{lname}/{i}/A"].float(), reference[f"{lname}/{i}/B"].float()
            old = F.linear(F.linear(x2, a0), b0)
            new = F.linear(F.linear(x2, proj.lora_shared_A.float()), proj.lora_shared_B.float())
            terms.append((new - old).pow(2).sum() / old.pow(2).sum().clamp(min=1e-12))
    if not terms:
        raise RuntimeError("no module inputs were captured for the distillation loss")
    return torch.stack(terms).mean()

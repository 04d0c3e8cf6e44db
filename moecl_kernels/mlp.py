"""``FusedMoELoRAMLP``: MoE-CL at the FFN level (docs/spec.md §1.3), the paper's own mixing:
each expert is a whole MLP (its LoRA on the gate, up and down projections), and the gate
mixes the two MLP outputs. Computed by the FFN op: the base GEMMs run once.

It wraps

* a gated MLP: ``gate_proj``, ``up_proj``, ``down_proj`` (``nn.Linear``) and ``act_fn`` (Llama,
  Qwen2, Mistral, Gemma, ...), computing ``down(act(gate(x)) * up(x))``;
* a plain two-layer MLP: ``up_proj``/``down_proj`` + ``act_fn``, or ``fc1``/``fc2`` +
  ``activation_fn`` (``fc2(act(fc1(x)))``);
* a BERT-style layer: ``intermediate.dense`` + ``intermediate.intermediate_act_fn`` and
  ``output.dense``. BertOutput also applies dropout, the residual and LayerNorm after its dense;
  to keep that computation the layer is changed in place: ``layer.intermediate`` becomes this
  module (it returns the MLP's output, down projection included) and ``layer.output.dense`` a
  holder of the down projection's weights and experts that passes its input through.

The activation is the model's own, recognised by evaluating it (``ACTIVATIONS``). Checkpoint
names: the projections keep their names and their base ``weight``/``bias``; each gets
``lora_shared_A/B`` and ``lora_task_A.<k>/B.<k>``; ``moe_gate`` [2, d] is on the MLP.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Optional

import torch
import torch.nn as nn
from torch import Tensor

from .contract.activations import activation as _activation
from .contract.ffn_args import ACTIVATIONS
from . import snapshots
from .adapters_off import disabled
from .experts import LoRAProjection, MoEModule, check_args, check_flags
from .ops.ffn import moe_lora_mlp
from .routing import Routing, RoutingError, TaskIds, keep_alive, structure_changed

# (role -> attribute path, activation attribute path): the MLP layouts recognised, in order
LAYOUTS = (
    ({"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}, "act_fn"),
    ({"up": "up_proj", "down": "down_proj"}, "act_fn"),
    ({"up": "fc1", "down": "fc2"}, "activation_fn"),
    ({"up": "intermediate.dense", "down": "output.dense"}, "intermediate.intermediate_act_fn"),
)
LOOKED_FOR = ("gate_proj/up_proj/down_proj (nn.Linear) with act_fn (Llama, Qwen2, Mistral, Gemma), up_proj/down_proj "
              "with act_fn, fc1/fc2 with activation_fn, or a BERT-style layer: intermediate.dense with "
              "intermediate.intermediate_act_fn and output.dense")
_PROBE = torch.cat([torch.linspace(-8.0, 8.0, 161, dtype=torch.float64), torch.tensor([-30.0, -0.01, 0.01, 30.0],
                                                                                      dtype=torch.float64)])


def _get(module: nn.Module, path: str) -> Optional[object]:
    for part in path.split("."):
        module = getattr(module, part, None)
        if module is None:
            return None
    return module


def activation_kind(act: object, where: str) -> str:
    """The ``ACTIVATIONS`` entry the callable ``act`` computes, found by evaluating it; raises
    naming ``where`` if it computes none of them."""
    try:
        with torch.no_grad():
            out = act(_PROBE.clone())
    except Exception as e:  # noqa: BLE001 (anything the activation raises means: not recognised)
        out, err = None, f" (calling it raised {type(e).__name__}: {e})"
    else:
        err = ""
    if isinstance(out, Tensor) and out.shape == _PROBE.shape:
        for kind in ACTIVATIONS:
            if torch.allclose(out.double(), _activation(kind, _PROBE), rtol=1e-6, atol=1e-9):
                return kind
    raise ValueError(f"{where}: the MLP's activation {type(act).__name__} is not one the FFN op supports "
                     f"({', '.join(ACTIVATIONS)}){err}")


@dataclass
class MLPLayout:
    """How a module is an MLP: its projections by role, the activation and whether it is a
    BERT-style layer (changed in place)."""

    root: nn.Module
    paths: dict          # role ("gate", "up", "down") -> attribute path under root
    linears: dict        # role -> nn.Linear (or an existing projection holder)
    activation: str
    bert: bool
    act: object = None   # the model's activation callable


def mlp_layout(module: nn.Module, name: str = "mlp", strict: bool = True) -> Optional[MLPLayout]:
    """The layout of ``module`` (an MLP, or a BERT-style layer); raises naming ``name``, the
    module's type and what was looked for (``strict=False``: None if no layout matches; an
    unsupported activation of a matching layout still raises)."""
    if isinstance(module, FusedMoELoRAMLP):
        raise ValueError(f"module {name!r} is already a FusedMoELoRAMLP (model injected twice?)")
    for paths, act_path in LAYOUTS:
        linears = {role: _get(module, p) for role, p in paths.items()}
        if not all(isinstance(m, nn.Linear) for m in linears.values()):
            continue
        if "gate" not in paths and isinstance(_get(module, "gate_proj"), nn.Linear):
            continue  # a gated MLP is not a plain one
        act = _get(module, act_path)
        if act is None or not callable(act):
            continue
        bert = "." in paths["up"]
        if bert and linears["up"].out_features != linears["down"].in_features:
            continue
        return MLPLayout(module, dict(paths), linears, activation_kind(act, f"module {name!r}"), bert, act)
    if not strict:
        return None
    children = [n for n, _ in module.named_children()]
    raise ValueError(f"module {name!r} ({type(module).__name__}) is not an MLP FusedMoELoRAMLP recognises: it looked "
                     f"for {LOOKED_FOR}; the module has children {children}")


class MoELoRAProjection(nn.Module, LoRAProjection):
    """One projection of a :class:`FusedMoELoRAMLP`: the base ``nn.Linear``'s weight and bias
    and the projection's LoRA experts. The MLP computes; calling it directly is an error,
    except for the down projection of a BERT-style layer, which passes its input through (the
    MLP already applied it)."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, rslora: bool, passthrough: bool = False) -> None:
        super().__init__()
        self.init_projection(base, r, alpha, rslora)
        self.passthrough = passthrough

    def forward(self, z: Tensor) -> Tensor:
        if self.passthrough:
            return z
        raise RuntimeError("this projection is part of a FusedMoELoRAMLP: call the MLP, which computes all of it")

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"r={self.r}, experts={len(self.lora_task_A)}{', passthrough' if self.passthrough else ''}")


class FusedMoELoRAMLP(MoEModule):
    """Drop-in replacement for an MLP with MoE-CL experts at the FFN level (docs/spec.md §1.3).

    y = beta_shared FFN_shared(x) + beta_task FFN_t(x), FFN_e the MLP with expert e's LoRA on
    all its projections; t = -1: y = FFN_shared(x). Without a gate both experts' LoRA terms
    are added to one MLP (what three ungated linears compute). See the module docstring for
    the layouts and for BERT-style layers (changed in place)."""

    level = "ffn"

    def __init__(self, mlp: nn.Module, num_tasks: int, r: int = 8, alpha: float = 16.0, dropout: float = 0.05,
                 gate: bool = True, rslora: bool = False, backend: Optional[str] = None,
                 deterministic: bool = False, name: str = "mlp") -> None:
        super().__init__()
        layout = mlp_layout(mlp, name)
        num_tasks, r, alpha, dropout = check_args(num_tasks, r, dropout, alpha)
        gate, rslora, deterministic = check_flags(gate=gate, rslora=rslora, deterministic=deterministic)
        self.activation = layout.activation
        self.r, self.lora_alpha, self.use_rslora, self.dropout_p = r, alpha, bool(rslora), dropout
        self.backend = backend
        self.deterministic = bool(deterministic)
        self.bert = layout.bert
        self.roles: dict[str, str] = {}  # role -> child name
        # what was wrapped (lists: not children): the activation callable, and for mk.unload the MLP
        # (a BERT-style layer's intermediate module and output.dense) with its paths
        self._act = [layout.act]
        self._original = [mlp] if not layout.bert else [layout.root.intermediate, layout.root.output.dense]
        self._paths = dict(layout.paths)
        projections = {role: MoELoRAProjection(lin, r, alpha, rslora, passthrough=layout.bert and role == "down")
                       for role, lin in layout.linears.items()}
        for role, proj in projections.items():
            if layout.bert and role == "down":
                self._down = [proj]  # lives at layer.output.dense (a list: not a child of this module)
                continue
            child = layout.paths[role].rsplit(".", 1)[-1]
            self.add_module(child, proj)
            self.roles[role] = child
        self.scaling = projections["up"].scaling
        up = projections["up"]
        self.in_features, self.hidden_features = up.in_features, up.out_features
        self.out_features = projections["down"].out_features
        if gate:
            self.moe_gate = nn.Parameter(torch.empty(2, self.in_features, device=up.weight.device,
                                                     dtype=up.weight.dtype).normal_(0.0, 0.02))
        else:
            self.register_parameter("moe_gate", None)
        for proj in projections.values():
            proj.add_task_experts(num_tasks, True)
        self.collect_pooled = False  # store p_n in the routing context (mk.collect_pooled)
        self.train(mlp.training)
        if layout.bert:  # the layer computes LayerNorm(dropout(this(x)) + x)
            layout.root.intermediate = self
            layout.root.output.dense = projections["down"]
        structure_changed()

    # ------------------------------------------------------------------ the protocol
    def projection(self, role: str) -> Optional[MoELoRAProjection]:
        """The projection of ``role`` ("gate", "up", "down"); None for a plain MLP's gate."""
        if role == "down" and self.bert:
            return self._down[0]
        child = self.roles.get(role)
        return getattr(self, child) if child is not None else None

    def lora_projections(self) -> list[LoRAProjection]:
        return [p for p in (self.projection(r) for r in ("gate", "up", "down")) if p is not None]

    def adapter_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """As ``MoEModule.adapter_parameters``; a BERT layer's down projection, which lives at the
        layer's ``output.dense``, is named ``../output.dense.<name>``."""
        yield from super().adapter_parameters()
        if self.bert:
            yield from ((f"../output.dense.{n}", p) for n, p in self._down[0].lora_parameters())

    @classmethod
    def expected_adapters(cls, model: nn.Module, name: str, r: int, num_tasks: int, gate: bool) -> dict[str, tuple]:
        root_name, layout = find_mlp(model, name)
        shapes = {}
        for role, path in layout.paths.items():
            lin = layout.linears[role]
            full = f"{root_name}.{path}" if root_name else path
            d_out, d_in = lin.weight.shape
            shapes[f"{full}.lora_shared_A"], shapes[f"{full}.lora_shared_B"] = (r, d_in), (d_out, r)
            for k in range(num_tasks):
                shapes[f"{full}.lora_task_A.{k}"], shapes[f"{full}.lora_task_B.{k}"] = (r, d_in), (d_out, r)
        if gate:
            shapes[f"{name}.moe_gate"] = (2, layout.linears["up"].in_features)
        return shapes

    # ------------------------------------------------------------------ forward
    def forward(self, x: Tensor, task_ids: Optional[TaskIds] = None, *, routing: Optional[Routing] = None) -> Tensor:
        """``task_ids``: one int, [B] or [B, S] for x [B, S, d] (docs/spec.md, "Routing");
        without it, the routing in force (``model(..., task_ids=)`` or ``mk.use_tasks``)."""
        if x.shape[-1] != self.in_features:
            raise ValueError(f"x has {x.shape[-1]} features in its last dim but the MLP expects {self.in_features}")
        if disabled(self):  # mk.disable_adapters: the wrapped MLP exactly, no routing needed
            return self.base_forward(x)
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        R, ctx = self.routing_for(lead, x.device, task_ids, routing)
        dt = x2.dtype
        autocast = torch.is_autocast_enabled(x2.device.type)
        if autocast:  # what the MLP's linears do under autocast
            dt = torch.get_autocast_dtype(x2.device.type)
            x2 = x2.to(dt)
        tensors: dict[str, Optional[Tensor]] = {}
        for role in ("gate", "up", "down"):
            proj = self.projection(role)
            if proj is None:
                continue
            pre = f"{role}_proj"
            # the base weights must match x (as for nn.Linear); the LoRA weights are cast to x's dtype
            w, b = proj.weight, proj.bias
            tensors[f"{pre}_weight"] = w.to(dt) if autocast else w
            tensors[f"{pre}_bias"] = (b.to(dt) if autocast else b) if b is not None else None
            tensors[f"{pre}_shared_A"], tensors[f"{pre}_shared_B"] = proj.lora_shared_A.to(dt), proj.lora_shared_B.to(dt)
            tensors[f"{pre}_task_A"], tensors[f"{pre}_task_B"] = proj.stacked_experts(dt)
        tensors["moe_gate"] = self.moe_gate.to(dt) if self.moe_gate is not None else None
        tensors.update(snapshots.ffn_args(self, dt))  # frozen tasks (mk.freeze_task)
        p = self.dropout_p if self.training else 0.0
        # drawn on x's device: a captured CUDA graph replays a fresh seed
        seed = torch.randint(0, 2**31 - 1, (), dtype=torch.int64, device=x.device) if p > 0.0 else None
        pool = self._pool(R) if ctx is not None and self.collect_pooled else None
        y, h_pool, z_pool = moe_lora_mlp(
            x2, R, activation=self.activation, scale=self.scaling, dropout_p=p, seed=seed, pool=pool,
            expert_trainable=self.expert_trainable(), deterministic=self.deterministic, backend=self.backend,
            **tensors,
        )
        if ctx is not None:
            keep_alive(y, [ctx])  # a checkpointed recomputation in backward finds this call's routing
            if pool is not None:
                ctx.store_pooled(self, self.pooled(h_pool.to(dt), z_pool.to(dt)))
        return y.reshape(*lead, self.out_features)

    def base_forward(self, x: Tensor) -> Tensor:
        """The wrapped MLP's own computation on the base weights (no experts, no gate)."""
        def proj(role: str, z: Tensor) -> Tensor:
            p = self.projection(role)
            return torch.nn.functional.linear(z, p.weight, p.bias)

        act = self._act[0]
        h = act(proj("gate", x)) * proj("up", x) if self.projection("gate") is not None else act(proj("up", x))
        return proj("down", h)

    def _pool(self, routing: Routing) -> Tensor:
        if routing.batch_shape is None:
            raise RoutingError("pooled outputs need a [batch, seq] input (the MLP got flattened tokens)")
        if not self.gate:
            raise ValueError("collect_pooled needs gate=True at the FFN level: without a gate FFN_shared(x) is not "
                             "evaluated (both experts' LoRA share one MLP)")
        return routing.pool_weights()

    def pooled(self, h_pool: Tensor, z_pool: Tensor) -> Tensor:
        """p_n of docs/spec.md §1.3, the masked mean of FFN_shared(x): the down projection of the
        pooled h_shared plus the shared down LoRA of the pooled z_shared ([B, d_out], no T x d GEMM)."""
        down = self.projection("down")
        dt = h_pool.dtype
        p = torch.nn.functional.linear(h_pool, down.weight.to(dt), down.bias.to(dt) if down.bias is not None else None)
        return p + self.scaling * torch.nn.functional.linear(z_pool, down.lora_shared_B.to(dt))

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, hidden_features={self.hidden_features}, "
                f"out_features={self.out_features}, activation={self.activation}, num_tasks={self.num_tasks}, "
                f"r={self.r}, alpha={self.lora_alpha:g}, scaling={self.scaling:g}{' (rslora)' if self.use_rslora else ''}, "
                f"dropout={self.dropout_p:g}, gate={self.gate}, backend={self.backend or 'auto'}")


def find_mlp(model: nn.Module, name: str) -> tuple[str, MLPLayout]:
    """(name of the layout's root, layout) of the MLP that injection at ``name`` wraps: the module
    at ``name``, or for a BERT-style layer's ``intermediate``, its layer."""
    module = model.get_submodule(name) if name else model
    parent_name, _, child = name.rpartition(".")
    if child == "intermediate" and not any(isinstance(_get(module, p), nn.Linear) for p in ("up_proj", "fc1")):
        parent = model.get_submodule(parent_name) if parent_name else model
        if isinstance(_get(parent, "output.dense"), nn.Linear):
            return parent_name, mlp_layout(parent, parent_name or type(parent).__name__)
    return name, mlp_layout(module, name)


def routed_name(root_name: str, layout: MLPLayout) -> str:
    """Where the :class:`FusedMoELoRAMLP` of a layout lives: the MLP's own name, or a BERT layer's ``intermediate``."""
    return (f"{root_name}.intermediate" if root_name else "intermediate") if layout.bert else root_name

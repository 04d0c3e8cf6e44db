"""The implementations the op microbenchmark times, each behind one interface.

A provider computes one of three semantics, and is checked against the float64 oracle
(``moe_lora_reference``) evaluated with the matching parameters:

* ``base``: y = x W^T (the floor every ratio is taken against)
* ``lora``: plain LoRA of the routed task, no shared expert, no gate (what PEFT computes)
* ``moe``:  the full op of docs/spec.md §1 (shared + routed task expert, gated)

Providers: base (``F.linear``), eager / triton-<variant> / cuda (the op's backends; one Triton
provider per kernel variant of the backend: ``triton-addmm`` (the default that ``backend="triton"``
runs), ``triton-fused``, ``triton-gemm``, ``triton-gemm-ptr``, ``triton-gemm-tma``), reference (the
per-token oracle formula in the working dtype: what a naive implementation costs), peft (PEFT LoRA,
single adapter: one-task batches), peft-mixed (PEFT's mixed-adapter batch, ``adapter_names=``:
inference only, mixed batches of equal-length sequences) and grouped_mm (the op built from
``torch._grouped_mm``, where the device supports it).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moecl_kernels import backends as mk_backends
from moecl_kernels.ops import moe_lora_linear, moe_lora_reference
from moecl_kernels.routing import Routing

try:
    from moecl_kernels.backends.triton.configs import DECODE_T  # token counts that take the decode path
except ImportError:  # no Triton: its providers skip anyway
    DECODE_T = 0

# The reference provider materialises [T, r, d_in] and [T, d_out, r] gathers; above this many
# bytes (x3 with backward) it is skipped rather than run out of memory.
REFERENCE_MAX_BYTES = {"cuda": 8 * 2**30, "cpu": 2**30}


@dataclass
class InputSet:
    """One rotation set of a case's tensors (LoRA weights and x require grad in fwd+bwd mode)."""

    x: Tensor            # [T, d_in]
    weight: Tensor       # [d_out, d_in], frozen
    shared_A: Tensor     # [r, d_in]
    shared_B: Tensor     # [d_out, r]
    task_A: Tensor       # [E, r, d_in]
    task_B: Tensor       # [E, d_out, r]
    gate_weight: Tensor  # [2, d_in]
    grad_y: Tensor       # [T, d_out]

    def tensors(self) -> list[Tensor]:
        return [self.x, self.weight, self.shared_A, self.shared_B, self.task_A, self.task_B, self.gate_weight,
                self.grad_y]


@dataclass
class Problem:
    """Everything a provider needs for one case."""

    sets: list[InputSet]
    routing: Routing
    seq_tasks: list[int]  # task id of each of the B sequences (-1 = none); tokens are [B, T // B]
    scale: float
    alpha: float
    backward: bool        # fwd+bwd mode
    device: torch.device
    ragged: bool = False  # sequences of unequal lengths (seq_tasks then cannot be laid out as [B, S])

    @property
    def dims(self) -> tuple[int, int, int, int, int]:
        s = self.sets[0]
        E, r, d_in = s.task_A.shape
        return s.x.shape[0], d_in, s.weight.shape[0], r, E

    @property
    def single_task(self) -> Optional[int]:
        """The task of every token if the batch has exactly one, else None."""
        return self.seq_tasks[0] if len(set(self.seq_tasks)) == 1 and self.seq_tasks[0] >= 0 else None


@dataclass
class Bound:
    """A provider bound to one input set: ``forward()`` -> y [T, d_out]; ``targets`` are the
    tensors its backward differentiates, named as the oracle's grads (``"task_A[3]"`` for
    one expert's slice)."""

    forward: Callable[[], Tensor]
    targets: dict[str, Tensor]


class Provider:
    name: str = ""
    semantics: str = "moe"

    def skip_reason(self, p: Problem) -> Optional[str]:
        """None if this provider runs this case, else why not (unavailable / not applicable)."""
        return None

    def bind(self, p: Problem, i: int) -> Bound:
        raise NotImplementedError

    def bind_all(self, p: Problem) -> list[Bound]:
        return [self.bind(p, i) for i in range(len(p.sets))]


def _moe_targets(s: InputSet, with_x: bool = True) -> dict[str, Tensor]:
    t = {"shared_A": s.shared_A, "shared_B": s.shared_B, "task_A": s.task_A, "task_B": s.task_B,
         "gate_weight": s.gate_weight}
    return {"x": s.x, **t} if with_x else t


class BaseLinear(Provider):
    """``F.linear``; timed twice per case (``base`` and ``base-repeat``, round-robin with the rest):
    their ratio is the run's noise floor, beside every ratio to the base."""

    semantics = "base"

    def __init__(self, name: str = "base"):
        self.name = name

    def bind(self, p, i):
        s = p.sets[i]
        return Bound(lambda: F.linear(s.x, s.weight), {"x": s.x})


TRITON_PROVIDERS = {f"triton-{v}": v for v in ("addmm", "fused", "gemm", "gemm-ptr", "gemm-tma")}
# extra tiles as providers of their own (moecl_kernels.backends.triton.variants.TILE_PROVIDERS)
TILE_PROVIDER_NAMES = ("triton-gemm-tma-2cta", "triton-gemm-decode-1wave")
TRITON_PROVIDERS.update({n: n[len("triton-"):] for n in TILE_PROVIDER_NAMES})


def register_triton_variant_backends() -> None:
    """Register the Triton backend once per kernel variant, as ``triton-<variant>``, for this
    process (benchmarks only; priority -1: ``auto`` never picks them), so every variant is timed
    in the same run as the default and the base."""
    for name, variant in TRITON_PROVIDERS.items():
        if name in mk_backends.registered_backends():
            continue

        def factory(name=name, variant=variant):
            from moecl_kernels.backends.triton import TritonBackend
            from moecl_kernels.backends.triton.variants import TILE_PROVIDERS

            tiles = None
            if variant in TILE_PROVIDERS:
                variant, tiles = TILE_PROVIDERS[variant][0], dict(TILE_PROVIDERS[variant][1])
            b = TritonBackend(variant=variant, tiles=tiles)
            b.name, b.priority = name, -1
            return b

        mk_backends.register_backend(name, factory)


class OpBackend(Provider):
    """``moe_lora_linear(..., backend=name)``: the library's eager, triton (one provider per
    kernel variant) or cuda backend."""

    semantics = "moe"

    def __init__(self, backend: str):
        self.name = backend
        if backend in TRITON_PROVIDERS:
            register_triton_variant_backends()

    def skip_reason(self, p):
        if self.name != "eager" and p.device.type != "cuda":
            return "GPU backend: timed on a GPU only"
        if self.name == "triton-gemm-decode-1wave" and p.dims[0] > DECODE_T:
            return f"a decode tile: above T = {DECODE_T} it runs triton-gemm's kernels"
        if self.name.startswith("triton-gemm-tma") and torch.cuda.get_device_capability(p.device)[0] < 9:
            return "TMA needs sm_90+"
        try:
            mk_backends.resolve_backend(self.name, p.sets[0].x)
        except (mk_backends.BackendUnavailableError, ValueError) as e:
            return str(e)
        return None

    def bind(self, p, i):
        s = p.sets[i]

        def forward():
            return moe_lora_linear(s.x, s.weight, None, s.shared_A, s.shared_B, s.task_A, s.task_B, s.gate_weight,
                                   p.routing, scale=p.scale, backend=self.name)

        return Bound(forward, _moe_targets(s))


class Reference(Provider):
    """The oracle's per-token formula in the working dtype, differentiated by autograd."""

    name, semantics = "reference", "moe"

    def skip_reason(self, p):
        T, d_in, d_out, r, _ = p.dims
        need = T * r * (d_in + d_out) * p.sets[0].x.element_size() * (3 if p.backward else 1)
        cap = REFERENCE_MAX_BYTES.get(p.device.type, 2**30)
        if need > cap:
            return f"needs ~{need / 2**30:.1f} GiB for its per-token gathers (cap {cap / 2**30:.0f} GiB)"
        return None

    def bind(self, p, i):
        s = p.sets[i]

        def forward():
            return moe_lora_reference(s.x, s.weight, None, s.shared_A, s.shared_B, s.task_A, s.task_B,
                                      s.gate_weight, p.routing.token_task, p.scale)

        return Bound(forward, _moe_targets(s))


class _PeftBase(nn.Module):
    def __init__(self, lin: nn.Linear):
        super().__init__()
        self.lin = lin

    def forward(self, x):
        return self.lin(x)


def peft_lora_layer(s: InputSet, tasks: list[int], r: int, alpha: float) -> nn.Module:
    """A PEFT ``lora.Linear`` over a frozen linear that shares ``s.weight``'s storage, with one
    adapter ``task{k}`` per task k in ``tasks`` holding copies of that task expert's A and B."""
    from peft import LoraConfig, inject_adapter_in_model

    d_out, d_in = s.weight.shape
    lin = nn.Linear(d_in, d_out, bias=False, device="meta")
    lin.weight = nn.Parameter(s.weight.detach(), requires_grad=False)
    model = _PeftBase(lin)
    cfg = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=["lin"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Already found a peft_config": adding adapters on purpose
        for k in tasks:
            model = inject_adapter_in_model(cfg, model, adapter_name=f"task{k}")
    layer = model.lin
    with torch.no_grad():
        for k in tasks:
            layer.lora_A[f"task{k}"].weight.copy_(s.task_A[k])
            layer.lora_B[f"task{k}"].weight.copy_(s.task_B[k])
    return layer


class PeftSingle(Provider):
    """PEFT LoRA with one adapter (the batch's task): what a single-LoRA user runs."""

    name, semantics = "peft", "lora"

    def skip_reason(self, p):
        if p.single_task is None:
            return "single adapter: one-task batches only"
        return _peft_missing()

    def bind(self, p, i):
        s = p.sets[i]
        k = p.single_task
        _, _, _, r, _ = p.dims
        layer = peft_lora_layer(s, [k], r, p.alpha)
        layer.set_adapter(f"task{k}")
        layer.train(p.backward)
        tgt = {"x": s.x, f"task_A[{k}]": layer.lora_A[f"task{k}"].weight,
               f"task_B[{k}]": layer.lora_B[f"task{k}"].weight}
        return Bound(lambda: layer(s.x), tgt)


class PeftMixed(Provider):
    """PEFT's mixed-adapter batch (``adapter_names=``, one name per sequence, ``__base__`` for
    no task): PEFT's inference-only path for batches that mix tasks."""

    name, semantics = "peft-mixed", "lora"

    def skip_reason(self, p):
        if p.backward:
            return "PEFT's mixed-adapter batches are inference only"
        if p.single_task is not None:
            return "one-task batch: see peft"
        if p.ragged:
            return "ragged sequences: PEFT's adapter_names needs a [batch, seq] layout"
        return _peft_missing()

    def bind(self, p, i):
        s = p.sets[i]
        T, d_in, d_out, r, E = p.dims
        layer = peft_lora_layer(s, list(range(E)), r, p.alpha).eval()  # every expert loaded, as in serving
        names = [f"task{k}" if k >= 0 else "__base__" for k in p.seq_tasks]
        B = len(names)
        return Bound(lambda: layer(s.x.view(B, T // B, d_in), adapter_names=names).view(T, d_out), {})


def _peft_missing() -> Optional[str]:
    try:
        import peft  # noqa: F401
    except ImportError as e:
        return f"peft is not installed ({e})"
    return None


class GroupedMM(Provider):
    """The full op from ``torch._grouped_mm``: base GEMM, shared LoRA on all tokens, and the
    routed experts as two grouped GEMMs over the task-sorted tokens (gather before, index_add
    after); autograd differentiates it."""

    name, semantics = "grouped_mm", "moe"
    _probe: dict = {}

    def skip_reason(self, p):
        if not hasattr(torch, "_grouped_mm"):
            return f"torch {torch.__version__} has no torch._grouped_mm"
        s = p.sets[0]
        _, d_in, d_out, r, E = p.dims
        key = (str(p.device), s.x.dtype, d_in, d_out, r, E, p.backward)
        if key not in self._probe:
            try:  # a small call with this case's operand shapes: unsupported devices/dtypes/layouts raise
                xs = torch.randn(8, d_in, device=p.device, dtype=s.x.dtype, requires_grad=p.backward)
                A, B = (t.detach().clone().requires_grad_(p.backward) for t in (s.task_A, s.task_B))
                offs = torch.full((E,), 8, device=p.device, dtype=torch.int32)
                h = torch._grouped_mm(xs, A.transpose(1, 2), offs=offs)
                y = torch._grouped_mm(h, B.transpose(1, 2), offs=offs)
                if p.backward:
                    torch.autograd.grad(y, [xs, A, B], torch.randn_like(y))
                self._probe[key] = None
            except Exception as e:  # RuntimeError for unsupported architecture/dtype/alignment
                self._probe[key] = f"torch._grouped_mm unsupported here: {str(e).splitlines()[0]}"
        return self._probe[key]

    def bind(self, p, i):
        s = p.sets[i]
        rt = p.routing
        off = [int(v) for v in rt.offsets_cpu.tolist()]
        n_task = off[-1]
        idx = rt.sorted_idx[:n_task].long()
        offs = rt.expert_offsets[1:]
        has = (rt.token_task >= 0).unsqueeze(1)

        def forward():
            x = s.x
            beta = torch.softmax(F.linear(x, s.gate_weight).float(), dim=-1)
            c_s = torch.where(has, beta[:, :1], torch.ones_like(beta[:, :1])) * p.scale
            y = F.linear(x, s.weight)
            y = torch.addmm(y, (F.linear(x, s.shared_A).float() * c_s).to(x.dtype), s.shared_B.t())
            if n_task == 0:
                return y
            h = torch._grouped_mm(x.index_select(0, idx), s.task_A.transpose(1, 2), offs=offs)
            g = (h.float() * (p.scale * beta.index_select(0, idx)[:, 1:])).to(x.dtype)
            return y.index_add(0, idx, torch._grouped_mm(g, s.task_B.transpose(1, 2), offs=offs))

        return Bound(forward, _moe_targets(s))


def all_providers() -> list[Provider]:
    return [BaseLinear(), BaseLinear("base-repeat"), OpBackend("eager"), *map(OpBackend, TRITON_PROVIDERS),
            OpBackend("cuda"), Reference(), PeftSingle(), PeftMixed(), GroupedMM()]

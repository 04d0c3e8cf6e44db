"""Frozen tasks (``mk.freeze_task``): the FFN-level op against its float64 reference on every
backend, fp64 gradcheck and opcheck of both ops with snapshots, and the module API (both levels):
frozen rows keep their outputs while the live experts train, one op call per layer for a mixed
batch, gradients reach only live parameters, state_dict / mk.save / mk.load (and version 1 files),
add_tasks, set_trainable, unfreeze and bad input."""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
import torch.nn as nn
from helpers import ffn_inputs, op_inputs, rel_err, token_tasks
from test_conformance import snapshot_inputs

import moecl_kernels as mk
from moecl_kernels import backends as bk
from moecl_kernels.contract.ffn_reference import moe_lora_mlp_reference
from moecl_kernels.io import LoadError
from moecl_kernels.ops import moe_lora_linear, moe_lora_mlp
from moecl_kernels.routing import build_routing

DIMS = {"gate_proj": lambda d, f: (d, f), "up_proj": lambda d, f: (d, f), "down_proj": lambda d, f: (f, d)}


def ffn_snapshots(d, d_ff, r, E, g, gated_mlp=True, moe_gate=True, num_slots=2):
    out = {}
    for p, dims in DIMS.items():
        if p == "gate_proj" and not gated_mlp:
            continue
        d_in, d_o = dims(d, d_ff)
        out[f"{p}_snap_shared_A"] = torch.randn(num_slots, r, d_in, generator=g, dtype=torch.float64) * d_in**-0.5
        out[f"{p}_snap_shared_B"] = torch.randn(num_slots, d_o, r, generator=g, dtype=torch.float64) * r**-0.5
    out["snap_gate"] = torch.randn(num_slots, 2, d, generator=g, dtype=torch.float64) * d**-0.5 if moe_gate else None
    slots = [-1] * E
    for f, k in enumerate(k for k in (2, 0) if k < E):
        slots[k] = f
    return out, torch.tensor(slots)


FFN_CASES = [("partial", True, True, True, 0.1), ("mixed", True, False, False, 0.0), ("single", False, True, False, 0.1),
             ("mixed", False, True, True, 0.1)]


@pytest.mark.parametrize("backend", ["eager", "reference", "triton"])
@pytest.mark.parametrize("routing,gated_mlp,moe_gate,pool,p", FFN_CASES)
def test_ffn_op_with_frozen_tasks(backend, routing, gated_mlp, moe_gate, pool, p):
    """y, the pooled outputs and every live gradient of the FFN op on a mixed batch with frozen tasks'
    tokens, against the float64 reference (with per-token snapshots)."""
    try:
        bk.resolve_backend(backend, torch.empty(1, dtype=torch.float32))
    except (bk.BackendUnavailableError, ValueError) as e:
        pytest.skip(str(e))
    T, d, d_ff, r, E = 24, 9, 13, 3, 4
    inp, g = ffn_inputs(T, d, d_ff, r, E, gated_mlp=gated_mlp, moe_gate=moe_gate)
    snaps, slots = ffn_snapshots(d, d_ff, r, E, g, gated_mlp, moe_gate)
    tt = token_tasks(routing, T, E, g)
    if routing == "single":
        tt = torch.full((T,), 2)  # a frozen task
    R = build_routing(tt, E, T)
    w = torch.rand(4, 6, generator=g, dtype=torch.float64)
    w = w / w.sum(1, keepdim=True) if pool else None
    x = inp.pop("x")
    kw = dict(activation="silu", scale=1.3, dropout_p=p)
    dtype = torch.float64 if backend != "triton" else torch.float32
    cast = {k: (v.detach().to(dtype).requires_grad_(v.requires_grad) if v is not None else None) for k, v in inp.items()}
    xc = x.detach().to(dtype).requires_grad_(True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        y, h_pool, z_pool = moe_lora_mlp(xc, R, seed=torch.tensor(11), pool=w, backend=backend, task_slot=slots,
                                         **kw, **cast, **{k: v.to(dtype) if v is not None else None for k, v in snaps.items()})
    out = moe_lora_mlp_reference(x, token_task=tt, seed=11, pool=w, parts=True, task_slot=slots, **kw, **inp, **snaps)
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    assert rel_err(y, out["y"]) <= tol
    names = ["x"] + [n for n, v in inp.items() if v is not None and v.requires_grad]
    gy = torch.randn(y.shape, generator=g, dtype=torch.float64)
    outs, grads = [y], [gy.to(dtype)]
    ref_outs, ref_grads = [out["y"]], [gy]
    if pool:
        assert rel_err(h_pool, out["h_pool"]) <= tol and rel_err(z_pool, out["z_pool"]) <= tol
        gh, gz = torch.randn_like(out["h_pool"]), torch.randn_like(out["z_pool"])
        outs += [h_pool, z_pool]
        grads += [gh.to(h_pool.dtype), gz.to(z_pool.dtype)]
        ref_outs += [out["h_pool"], out["z_pool"]]
        ref_grads += [gh, gz]
    got = torch.autograd.grad(outs, [xc] + [cast[n] for n in names[1:]], grads)
    want = torch.autograd.grad(ref_outs, [x] + [inp[n] for n in names[1:]], ref_grads)
    for n, a, b in zip(names, got, want):
        assert rel_err(a, b) <= tol * 10, f"d{n}: {rel_err(a, b):.3g}"


def test_gradcheck_with_frozen_tasks():
    """fp64 gradcheck of both ops through eager with frozen tasks' tokens."""
    T, d_in, d_out, r, E = 8, 5, 4, 2, 3
    inp, g = op_inputs(T, d_in, d_out, r, E)
    snaps = snapshot_inputs(r, d_in, d_out, E, True, g)
    tt = torch.tensor([0, 1, 2, -1, 2, 0, 1, 2])
    R = build_routing(tt, E, T)
    names = ["x", "shared_A", "shared_B", "task_A", "task_B", "gate_weight"]

    def f(*ts):
        return moe_lora_linear(**dict(inp, **dict(zip(names, ts))), routing=R, scale=1.5, dropout_p=0.2,
                               seed=torch.tensor(3), backend="eager", **snaps)

    assert torch.autograd.gradcheck(f, [inp[n] for n in names])
    fi, g = ffn_inputs(6, 3, 4, 1, E)
    fs, slots = ffn_snapshots(3, 4, 1, E, g)
    tt = torch.tensor([0, 1, 2, -1, 2, 0])
    fnames = ["x", "gate_proj_shared_A", "up_proj_shared_B", "down_proj_shared_A", "down_proj_task_B", "moe_gate"]

    def ffn(*ts):
        t = dict(fi, **dict(zip(fnames, ts)))
        return moe_lora_mlp(t.pop("x"), build_routing(tt, E, 6), activation="gelu", scale=1.1, dropout_p=0.2,
                            seed=torch.tensor(4), backend="eager", task_slot=slots, **t, **fs)[0]

    assert torch.autograd.gradcheck(ffn, [fi[n] for n in fnames])


def test_opcheck_with_frozen_tasks():
    """The linear op's schema, fake and autograd registration with the snapshot fields set."""
    from moecl_kernels.ops.custom_ops import FWD_SCHEMA_ARGS, call_args

    T, d_in, d_out, r, E = 8, 5, 4, 2, 3
    inp, g = op_inputs(T, d_in, d_out, r, E)
    snaps = snapshot_inputs(r, d_in, d_out, E, True, g)
    R = build_routing(torch.tensor([0, 1, 2, -1, 2, 0, 1, 2]), E, T)

    args = call_args(FWD_SCHEMA_ARGS, **{k: v.detach() if v is not None else None for k, v in inp.items()},
                     token_task=R.token_task, sorted_idx=R.sorted_idx, expert_offsets=R.expert_offsets,
                     offsets_cpu=R.offsets_cpu, single_task=R.single_task, scale=1.3, dropout_p=0.1,
                     seed=torch.tensor(5), expert_trainable=[], deterministic=False, backend="eager",
                     **dict(snaps, task_slot=snaps["task_slot"].int(), task_slot_cpu=snaps["task_slot"]))
    torch.library.opcheck(torch.ops.moecl.moe_lora_fwd.default, args)


def test_op_errors_name_the_argument():
    inp, g = op_inputs(6, 5, 4, 2, 3)
    snaps = snapshot_inputs(2, 5, 4, 3, True, g)
    R = build_routing(torch.tensor([0, 1, 2, 0, 1, 2]), 3, 6)
    kw = dict(routing=R, scale=1.0)
    with pytest.raises(ValueError, match="task_slot must be an integer \\[E=3\\]"):
        moe_lora_linear(**inp, **kw, **dict(snaps, task_slot=torch.tensor([0, 1])))
    with pytest.raises(ValueError, match="snap_shared_B must be"):
        moe_lora_linear(**inp, **kw, **dict(snaps, snap_shared_B=snaps["snap_shared_B"][:, :3]))
    with pytest.raises(ValueError, match="out of range"):
        moe_lora_linear(**inp, **kw, **dict(snaps, task_slot=torch.tensor([5, -1, 0])))
    with pytest.raises(ValueError, match="snap_gate is required"):
        moe_lora_linear(**inp, **kw, **dict(snaps, snap_gate=None))


# ---------------------------------------------------------------------------------------------- modules
class MLP(nn.Module):
    def __init__(self, d=12, d_ff=20):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = nn.Linear(d, d_ff), nn.Linear(d, d_ff), nn.Linear(d_ff, d)
        self.act_fn = nn.SiLU()

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.mlp = MLP()
        self.head = nn.Linear(12, 12)

    def forward(self, x):
        return self.head(self.mlp(x))


def _model(level: str, seed: int = 0, E: int = 3) -> nn.Module:
    torch.manual_seed(seed)
    net = Net().double()
    if level == "linear":
        mk.inject(net, target_modules=["gate_proj", "up_proj", "down_proj", "head"], num_tasks=E, r=4, dropout=0.1)
    else:
        mk.inject(net, target_modules=["mlp"], num_tasks=E, r=4, dropout=0.1, level="ffn")
    with torch.no_grad():
        for layer in mk.moe_layers(net).values():
            for _, p in layer.adapter_parameters():
                p.normal_(0, 0.3)
    return net


def _perturb_live(net):
    with torch.no_grad():
        for layer in mk.moe_layers(net).values():
            for n, p in layer.adapter_parameters():
                if "task" not in n:
                    p.add_(torch.randn_like(p) * 0.3)


LEVELS = ["linear", "ffn"]


@pytest.mark.parametrize("level", LEVELS)
def test_freeze_task_keeps_its_tokens_and_serves_mixed_batches_in_one_call(level, monkeypatch):
    net = _model(level).eval()
    x, t = torch.randn(4, 5, 12, dtype=torch.float64), torch.tensor([0, 1, 2, 0])
    before = net(x, task_ids=t)
    mk.freeze_task(net, 0)
    assert mk.frozen_tasks(net) == [0]
    _perturb_live(net)
    import moecl_kernels.layer as L
    import moecl_kernels.mlp as M

    calls = []
    for mod, name in ((L, "moe_lora_linear"), (M, "moe_lora_mlp")):
        real = getattr(mod, name)
        monkeypatch.setattr(mod, name, lambda *a, _r=real, **k: calls.append(1) or _r(*a, **k))
    after = net(x, task_ids=t)
    assert len(calls) == len(mk.moe_layers(net))  # one op call per layer for the mixed batch
    torch.testing.assert_close(after[t == 0], before[t == 0], rtol=1e-12, atol=1e-12)
    assert (after[t != 0] - before[t != 0]).abs().max() > 1e-2
    for k in range(3):  # the mixed batch equals one-task batches
        torch.testing.assert_close(net(x[t == k], task_ids=k), after[t == k], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("level", LEVELS)
def test_gradients_reach_only_live_parameters(level):
    """A frozen task's tokens give the live gate and shared expert nothing: their gradients on a mixed
    batch equal those of the batch without the frozen task's rows; the snapshots get none."""
    net = _model(level)
    mk.freeze_task(net, 1)
    mk.set_trainable(net, task=[0, 2])
    x, t = torch.randn(6, 5, 12, dtype=torch.float64), torch.tensor([0, 1, 2, 1, 0, 2])
    torch.manual_seed(5)
    net(x, task_ids=t)[t != 1].pow(2).sum().backward()
    live = {n: p.grad.clone() for n, p in net.named_parameters() if p.requires_grad and "task" not in n}
    net.zero_grad()
    torch.manual_seed(5)
    net(x, task_ids=t).pow(2).sum().backward()  # same dropout masks: the seed is drawn per call
    frozen_rows = torch.autograd.grad(net(x[t == 1], task_ids=1).pow(2).sum(),
                                      [p for n, p in net.named_parameters() if n in live], allow_unused=True)
    assert all(g is None or g.abs().max() == 0 for g in frozen_rows)
    assert all(not b.requires_grad and b.grad is None for n, b in net.named_buffers() if "moe_snap" in n)
    assert live


@pytest.mark.parametrize("level", LEVELS)
def test_state_dict_save_load_and_format_versions(level, tmp_path):
    net = _model(level)
    mk.freeze_task(net, 2)
    mk.freeze_task(net, 0)
    _perturb_live(net)
    net.eval()
    x, t = torch.randn(3, 4, 12, dtype=torch.float64), torch.tensor([0, 1, 2])
    y = net(x, task_ids=t)
    fresh = _model(level, seed=0)
    fresh.load_state_dict(copy.deepcopy(net.state_dict()))
    torch.testing.assert_close(fresh.eval()(x, task_ids=t), y, rtol=0, atol=0)
    mk.save(net, tmp_path / "a")
    assert json.loads((tmp_path / "a" / "moecl_config.json").read_text())["format_version"] == 2
    torch.manual_seed(0)
    plain = Net().double()
    mk.load(plain, tmp_path / "a")
    assert mk.frozen_tasks(plain) == [0, 2]
    torch.testing.assert_close(plain.eval()(x, task_ids=t), y, rtol=0, atol=0)
    other = _model(level, seed=0)
    mk.freeze_task(other, 1)
    mk.load(other, tmp_path / "a")  # the saved state, snapshots included
    assert mk.frozen_tasks(other) == [0, 2]
    # a version-1 file (no snapshots) still loads, and clears snapshots
    mk.unfreeze_task(net, 0)
    mk.unfreeze_task(net, 2)
    mk.save(net, tmp_path / "v1")
    cfg = json.loads((tmp_path / "v1" / "moecl_config.json").read_text())
    (tmp_path / "v1" / "moecl_config.json").write_text(json.dumps(dict(cfg, format_version=1)))
    mk.load(other, tmp_path / "v1")
    assert mk.frozen_tasks(other) == []


@pytest.mark.parametrize("level", LEVELS)
def test_bad_snapshot_file_leaves_the_model_unchanged(level, tmp_path):
    from safetensors.torch import load_file, save_file

    net = _model(level)
    mk.freeze_task(net, 1)
    mk.save(net, tmp_path)
    f = tmp_path / "moecl_adapter.safetensors"
    good = load_file(str(f))
    target = _model(level, seed=3)
    mk.freeze_task(target, 0)
    state = copy.deepcopy(target.state_dict())
    key = next(k for k in good if k.endswith("moe_snap_A"))
    bad_cases = [({k: v for k, v in good.items() if k != key}, "is missing"),
                 (dict(good, **{key: good[key][:, :1]}), "has shape"),
                 (dict(good, **{next(k for k in good if k.endswith("moe_snap_tasks")): torch.tensor([7])}), "distinct")]
    for tensors, msg in bad_cases:
        save_file(tensors, str(f))
        with pytest.raises(LoadError, match=msg):
            mk.load(target, tmp_path)
        assert mk.frozen_tasks(target) == [0]
        for k, v in target.state_dict().items():
            assert torch.equal(v, state[k]), k


@pytest.mark.parametrize("level", LEVELS)
def test_add_tasks_set_trainable_unfreeze(level):
    net = _model(level).eval()
    x = torch.randn(2, 3, 12, dtype=torch.float64)
    mk.freeze_task(net, 1)
    y1 = net(x, task_ids=1)
    mk.add_tasks(net, 2)
    assert mk.frozen_tasks(net) == [1]
    _perturb_live(net)
    torch.testing.assert_close(net(x, task_ids=1), y1, rtol=1e-12, atol=1e-12)
    net(x, task_ids=torch.tensor([4, 1]))  # a new task beside a frozen one
    with pytest.warns(RuntimeWarning, match="frozen"):
        mk.set_trainable(net, task=1)
    with pytest.raises(ValueError, match="out of range"):
        mk.freeze_task(net, 5)
    mk.unfreeze_task(net, 1)
    assert mk.frozen_tasks(net) == [] and not any("moe_snap" in n for n, _ in net.named_buffers())
    assert (net(x, task_ids=1) - y1).abs().max() > 1e-3


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_kernel_backend_runs_frozen_tokens_on_eager_and_other_calls_on_its_kernels(dtype):
    """Triton (the interpreter on a CPU): a call with frozen tasks' tokens falls back to eager, said
    once, and equals eager exactly; a call whose tokens are all live runs Triton's own kernels
    (no warning) and matches the call without snapshots."""
    try:
        bk.resolve_backend("triton", torch.empty(1, dtype=dtype))
    except (bk.BackendUnavailableError, ValueError) as e:
        pytest.skip(str(e))
    from moecl_kernels.ops import snapshots as ops_snap

    inp, g = op_inputs(12, 16, 8, 4, 3, dtype=dtype)
    snaps = {k: (v.to(dtype) if v is not None and v.is_floating_point() else v)
             for k, v in snapshot_inputs(4, 16, 8, 3, True, g).items()}  # tasks 2 and 0 frozen
    kw = dict(scale=1.5, dropout_p=0.1, seed=torch.tensor(9))
    mixed = build_routing(torch.tensor([0, 1, 2] * 4), 3, 12)
    bk._warned.discard("snap-triton")
    with pytest.warns(RuntimeWarning, match="frozen-task .* run on 'eager'"):
        y = moe_lora_linear(**inp, routing=mixed, backend="triton", **kw, **snaps)
    torch.testing.assert_close(y, moe_lora_linear(**inp, routing=mixed, backend="eager", **kw, **snaps), rtol=0, atol=0)
    live = build_routing(torch.tensor([1] * 12), 3, 12)
    assert not ops_snap.frozen_tokens(snaps["task_slot"], live)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        y_live = moe_lora_linear(**inp, routing=live, backend="triton", **kw, **snaps)
    torch.testing.assert_close(y_live, moe_lora_linear(**inp, routing=live, backend="triton", **kw), rtol=0, atol=0)


def test_custom_op_refuses_frozen_tasks_on_a_backend_without_them(monkeypatch):
    """Called directly (not through moe_lora_linear), the custom op refuses snapshot inputs for a
    backend that would ignore them."""
    from moecl_kernels.ops.custom_ops import FWD_SCHEMA_ARGS, call_args

    class Plain:  # a registered backend's shape, without serves_snapshots
        name = "plain-test"

    inp, g = op_inputs(6, 5, 4, 2, 3)
    snaps = snapshot_inputs(2, 5, 4, 3, True, g)
    R = build_routing(torch.tensor([0, 1, 2, 0, 1, 2]), 3, 6)
    args = call_args(FWD_SCHEMA_ARGS, **{k: v.detach() if v is not None else None for k, v in inp.items()},
                     token_task=R.token_task, sorted_idx=R.sorted_idx, expert_offsets=R.expert_offsets,
                     offsets_cpu=R.offsets_cpu, single_task=R.single_task, scale=1.0, dropout_p=0.0, seed=None,
                     expert_trainable=[], deterministic=False, backend="cuda",
                     **dict(snaps, task_slot=snaps["task_slot"].int(), task_slot_cpu=snaps["task_slot"]))
    real = bk.backend
    monkeypatch.setattr(bk, "backend", lambda name: Plain() if name == "cuda" else real(name))
    with pytest.raises(ValueError, match="cannot serve frozen tasks"):
        torch.ops.moecl.moe_lora_fwd(*args)

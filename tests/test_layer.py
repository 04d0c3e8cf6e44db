"""FusedMoELoRALinear: init, shapes, growth, errors (docs/spec.md §2, §5)."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn as nn

import moecl_kernels as mk
from helpers import check_dropout_seeding, rel_err
from moecl_kernels.backends import BackendUnavailableError


def make(d_in=24, d_out=20, E=3, r=4, gate=True, dropout=0.0, bias=True, seed=0):
    torch.manual_seed(seed)
    layer = mk.FusedMoELoRALinear(nn.Linear(d_in, d_out, bias=bias), num_tasks=E, r=r, alpha=8, dropout=dropout, gate=gate)
    with torch.no_grad():
        for p in [layer.lora_shared_B, *layer.lora_task_B]:
            p.normal_()
    return layer


def reference(layer, x2, tt, p=0.0, seed=0):
    A = torch.stack(list(layer.lora_task_A))
    B = torch.stack(list(layer.lora_task_B))
    return mk.moe_lora_reference(x2.double(), layer.weight.double(), layer.bias.double() if layer.bias is not None else None,
                                 layer.lora_shared_A.double(), layer.lora_shared_B.double(), A.double(), B.double(),
                                 layer.moe_gate.double() if layer.moe_gate is not None else None, tt,
                                 layer.scaling, p, seed)


def test_init_follows_spec():
    torch.manual_seed(0)
    base = nn.Linear(256, 128)
    layer = mk.FusedMoELoRALinear(base, num_tasks=2, r=8, alpha=16)
    assert layer.weight is base.weight and layer.bias is base.bias
    assert not layer.weight.requires_grad and not layer.bias.requires_grad
    assert layer.scaling == 2.0
    assert torch.all(layer.lora_shared_B == 0) and all(torch.all(b == 0) for b in layer.lora_task_B)
    bound = 1 / math.sqrt(256)  # kaiming_uniform(a=sqrt(5)) bound = 1/sqrt(fan_in)
    for a in [layer.lora_shared_A, *layer.lora_task_A]:
        assert a.abs().max() <= bound and a.abs().max() > 0.9 * bound
    assert abs(layer.moe_gate.std().item() - 0.02) < 0.003
    assert not torch.equal(layer.lora_task_A[0], layer.lora_task_A[1])
    assert mk.FusedMoELoRALinear(nn.Linear(4, 4), 1, r=4, alpha=8, rslora=True).scaling == 4.0
    assert "num_tasks=2, r=8, alpha=16" in repr(layer)


@pytest.mark.parametrize("shape", [(7,), (3, 5), (2, 3, 4)])
def test_any_leading_shape(shape):
    layer = make()
    x = torch.randn(*shape, 24)
    tt = torch.randint(-1, 3, shape)
    y = layer(x, task_ids=tt)
    assert y.shape == (*shape, 20)
    assert rel_err(y.reshape(-1, 20), reference(layer, x.reshape(-1, 24), tt.reshape(-1))) < 1e-6


def test_per_sequence_task_ids_broadcast():
    layer = make()
    x = torch.randn(3, 5, 24)
    y = layer(x, task_ids=torch.tensor([2, -1, 0]))
    tt = torch.tensor([2, -1, 0]).repeat_interleave(5)
    assert rel_err(y.reshape(-1, 20), reference(layer, x.reshape(-1, 24), tt)) < 1e-6
    y_int = layer(x, task_ids=1)
    assert rel_err(y_int.reshape(-1, 20), reference(layer, x.reshape(-1, 24), torch.full((15,), 1))) < 1e-6


def test_dropout_only_in_training_and_seeded_by_torch_rng():
    layer = make(dropout=0.3)
    check_dropout_seeding(layer, torch.randn(4, 6, 24))


def test_add_tasks_keeps_trained_experts():
    layer = make(E=2)
    before = [p.detach().clone() for p in [*layer.lora_task_A, *layer.lora_task_B]]
    layer.add_tasks(3)
    assert layer.num_tasks == 5
    after = [*layer.lora_task_A[:2], *layer.lora_task_B[:2]]
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    assert torch.all(layer.lora_task_B[4] == 0)
    x = torch.randn(6, 24)
    assert layer(x, task_ids=torch.tensor([4, 4, 1, 0, 3, -1])).shape == (6, 20)


def test_stack_cache_tracks_in_place_updates():
    layer = make()
    x = torch.randn(5, 24)
    with torch.no_grad():
        y1 = layer(x, task_ids=1)
        layer.lora_task_B[1].add_(1.0)
        y2 = layer(x, task_ids=1)
    assert not torch.equal(y1, y2)
    assert rel_err(y2, reference(layer, x, torch.full((5,), 1))) < 1e-6


def test_fp64_and_no_gate_and_no_bias():
    layer = make(gate=False, bias=False).double()
    x = torch.randn(9, 24, dtype=torch.float64)
    tt = torch.tensor([0, 1, 2, -1, 0, 1, 2, -1, 0])
    assert rel_err(layer(x, task_ids=tt), reference(layer, x, tt)) < 1e-12


# ---------------------------------------------------------------- errors name the argument


def test_error_task_id_out_of_range():
    layer = make(E=3)
    with pytest.raises(mk.RoutingError, match=r"task_ids contains task id 3, outside \[-1, 2\]"):
        layer(torch.randn(4, 24), task_ids=torch.tensor([0, 1, 3, 0]))
    with pytest.raises(mk.RoutingError, match="task_ids contains task id -2"):
        layer(torch.randn(4, 24), task_ids=torch.tensor([0, -2, 1, 0]))


def test_error_missing_routing():
    with pytest.raises(mk.RoutingError, match="task_ids is missing"):
        make()(torch.randn(4, 24))


def test_error_task_ids_shape():
    with pytest.raises(mk.RoutingError, match=r"task_ids has shape \[3\] but the input's tokens are \[8\]"):
        make()(torch.randn(8, 24), task_ids=torch.tensor([0, 1, 2]))
    with pytest.raises(mk.RoutingError, match=r"task_ids has shape \[3\] but the input's tokens are \[2, 4\]"):
        make()(torch.randn(2, 4, 24), task_ids=torch.tensor([0, 1, 2]))
    with pytest.raises(mk.RoutingError, match=r"task_ids has shape \[4, 2\] but the input's tokens are \[2, 4\]"):
        make()(torch.randn(2, 4, 24), task_ids=torch.zeros(4, 2, dtype=torch.long))
    with pytest.raises(mk.RoutingError, match="task_ids must hold integer task ids"):
        make()(torch.randn(8, 24), task_ids=torch.tensor([0.0, 1.0]))


def test_error_feature_mismatch():
    with pytest.raises(ValueError, match="in_features=24"):
        make()(torch.randn(4, 23), task_ids=0)


def test_error_dtype_mismatch():
    layer = make()
    with pytest.raises(ValueError, match="weight has dtype torch.float32 but x has torch.float64"):
        layer(torch.randn(4, 24, dtype=torch.float64), task_ids=0)


def test_error_bad_base_module():
    class Conv1D(nn.Module):
        pass

    with pytest.raises(TypeError, match="base_linear must be a torch.nn.Linear.*Conv1D"):
        mk.FusedMoELoRALinear(Conv1D(), num_tasks=2)
    with pytest.raises(ValueError, match="num_tasks must be an integer, got 1.7"):
        mk.FusedMoELoRALinear(nn.Linear(4, 4), num_tasks=1.7)
    with pytest.raises(ValueError, match="alpha must be > 0"):
        mk.FusedMoELoRALinear(nn.Linear(4, 4), num_tasks=1, alpha=0)
    with pytest.raises(ValueError, match="num_tasks must be >= 1"):
        mk.FusedMoELoRALinear(nn.Linear(4, 4), num_tasks=0)
    with pytest.raises(ValueError, match="r must be >= 1"):
        mk.FusedMoELoRALinear(nn.Linear(4, 4), num_tasks=1, r=0)
    with pytest.raises(ValueError, match=r"dropout must be in \[0, 1\)"):
        mk.FusedMoELoRALinear(nn.Linear(4, 4), num_tasks=1, dropout=1.0)


def test_error_unknown_and_unavailable_backend(monkeypatch):
    layer = make()
    x = torch.randn(4, 24)
    layer.backend = "nope"
    with pytest.raises(ValueError, match="backend='nope' is unknown"):
        layer(x, task_ids=0)
    layer.backend = "cuda"
    with pytest.raises(BackendUnavailableError, match="backend='cuda' is unavailable"):
        layer(x, task_ids=0)
    layer.backend = None
    monkeypatch.setenv("MOECL_BACKEND", "cuda")
    with pytest.raises(BackendUnavailableError, match="backend='cuda'"):
        layer(x, task_ids=0)
    monkeypatch.setenv("MOECL_BACKEND", "auto")
    assert layer(x, task_ids=0).shape == (4, 20)


def test_op_validation_names_arguments():
    from helpers import op_inputs

    inp, _ = op_inputs(6, 8, 5, 2, 3)
    R = mk.build_routing(torch.zeros(6, dtype=torch.long), 3, 6)
    bad = dict(inp, shared_B=torch.randn(5, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"shared_B must be \[d_out=5, r=2\]"):
        mk.moe_lora_linear(**bad, routing=R, scale=1.0)
    bad = dict(inp, task_A=torch.randn(4, 2, 8, dtype=torch.float64))
    with pytest.raises(ValueError, match="task_B must be \\[E=4"):
        mk.moe_lora_linear(**bad, routing=R, scale=1.0)
    R_wrong = mk.build_routing(torch.zeros(7, dtype=torch.long), 3, 7)
    with pytest.raises(ValueError, match="routing covers 7 tokens but x has 6"):
        mk.moe_lora_linear(**inp, routing=R_wrong, scale=1.0)
    with pytest.raises(ValueError, match="seed is required"):
        mk.moe_lora_linear(**inp, routing=R, scale=1.0, dropout_p=0.1)


def test_rank_above_a_backend_limit_falls_back_once(monkeypatch):
    """docs/spec.md §5: a rank above a kernel's limit falls back (to a backend that can) and says so once."""
    from moecl_kernels import backends
    from moecl_kernels.backends.eager import EagerBackend

    class Limited(EagerBackend):
        name, priority = "limited", 5

        def shape_unsupported_reason(self, rank, num_experts):
            return f"r={rank} is above the limited kernels' limit of 4" if rank > 4 else None

    monkeypatch.setitem(backends._factories, "limited", Limited)
    monkeypatch.setattr(backends, "_warned", set())
    small, big = make(r=4), make(r=8)
    x = torch.randn(6, 24)
    small.backend = big.backend = "limited"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        small(x, task_ids=1)
        y = big(x, task_ids=1)
        big(x, task_ids=1)
    msgs = [str(w.message) for w in caught if "limited" in str(w.message)]
    assert msgs == ["moecl_kernels: backend 'limited' cannot run this layer (r=8 is above the limited kernels' "
                    "limit of 4); falling back to 'eager'"]
    assert rel_err(y, reference(big, x, torch.full((6,), 1))) < 1e-6

"""FusedMoELoRAMLP standalone: layouts, the model's activation, reference match, protocol, errors
(docs/spec.md §1.3, §5)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from transformers import BertConfig
from transformers.activations import ACT2FN
from transformers.models.bert.modeling_bert import BertLayer
from transformers.models.llama.modeling_llama import LlamaMLP
from transformers.models.llama.configuration_llama import LlamaConfig

import moecl_kernels as mk
from helpers import check_dropout_seeding, rel_err


class FcMLP(nn.Module):
    """A plain two-layer MLP named like CLIP/Phi: fc2(act(fc1(x)))."""

    def __init__(self, d=12, d_ff=20, act="gelu_new"):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, d_ff), nn.Linear(d_ff, d)
        self.activation_fn = ACT2FN[act]

    def forward(self, x):
        return self.fc2(self.activation_fn(self.fc1(x)))


def llama_mlp(d=12, d_ff=20, act="silu", seed=0):
    torch.manual_seed(seed)
    return LlamaMLP(LlamaConfig(hidden_size=d, intermediate_size=d_ff, hidden_act=act, mlp_bias=False,
                                num_attention_heads=2))


def bert_layer(seed=0):
    torch.manual_seed(seed)
    return BertLayer(BertConfig(hidden_size=12, intermediate_size=20, num_attention_heads=2,
                                hidden_dropout_prob=0.0)).eval()


def randomize(mlp: mk.FusedMoELoRAMLP, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for proj in mlp.lora_projections():
            for p in [proj.lora_shared_B, *proj.lora_task_B]:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def reference(mlp: mk.FusedMoELoRAMLP, x2, tt, p=0.0, seed=0):
    kw = {}
    for role in ("gate", "up", "down"):
        proj = mlp.projection(role)
        if proj is None:
            continue
        pre = f"{role}_proj"
        kw[f"{pre}_weight"] = proj.weight.double()
        kw[f"{pre}_bias"] = proj.bias.double() if proj.bias is not None else None
        kw[f"{pre}_shared_A"], kw[f"{pre}_shared_B"] = proj.lora_shared_A.double(), proj.lora_shared_B.double()
        kw[f"{pre}_task_A"] = torch.stack(list(proj.lora_task_A)).double()
        kw[f"{pre}_task_B"] = torch.stack(list(proj.lora_task_B)).double()
    return mk.moe_lora_mlp_reference(x2.double(), **kw, moe_gate=mlp.moe_gate.double() if mlp.gate else None,
                                     token_task=tt, activation=mlp.activation, scale=mlp.scaling, dropout_p=p, seed=seed)


# exact: the model's activation calls the very torch function the op calls (NewGELU writes the
# tanh formula out: equal to F.gelu(approximate="tanh") up to rounding)
@pytest.mark.parametrize("make,act,exact", [
    (lambda: llama_mlp(act="silu"), "silu", True), (lambda: llama_mlp(act="gelu_pytorch_tanh"), "gelu_tanh", True),
    (lambda: FcMLP(act="gelu_new"), "gelu_tanh", False), (lambda: FcMLP(act="relu"), "relu", True),
    (bert_layer, "gelu", True)])
@pytest.mark.parametrize("gate", [True, False])
def test_layouts_match_reference_and_keep_names(make, act, exact, gate):
    base = make()
    x = torch.randn(3, 5, 12)
    with torch.no_grad():
        before = base(x) if not isinstance(base, BertLayer) else base.output.dense(base.intermediate(x))
    names = {n for n, _ in base.named_parameters()}
    mlp = mk.FusedMoELoRAMLP(base, num_tasks=3, r=4, alpha=8, dropout=0.0, gate=gate)
    assert mlp.activation == act
    owner = base if isinstance(base, BertLayer) else mlp
    assert names <= {n for n, _ in owner.named_parameters()}  # the base weights keep their names
    tt = torch.tensor([[0], [2], [-1]]).expand(3, 5)
    with torch.no_grad():  # B = 0: the wrapped MLP
        y0 = mlp(x, task_ids=tt)
        assert torch.equal(y0, before) if exact else rel_err(y0, before) < 1e-6
    randomize(mlp)
    y = mlp(x, task_ids=tt)
    assert rel_err(y.reshape(-1, 12), reference(mlp, x.reshape(-1, 12), tt.reshape(-1))) < 1e-6
    y.sum().backward()
    for n, p in mlp.adapter_parameters():  # task 1 has no token
        assert p.grad is not None and (p.grad.abs().max() == 0) == n.endswith(".1"), n


def test_bert_layer_keeps_its_dropout_residual_and_layernorm():
    layer = bert_layer()
    x = torch.randn(2, 4, 12)
    with torch.no_grad():
        ref = layer(x)[0] if isinstance(layer(x), tuple) else layer(x)
    mlp = mk.FusedMoELoRAMLP(layer, num_tasks=2, r=4, alpha=8)
    assert layer.intermediate is mlp and layer.output.dense.passthrough
    assert sorted(n for n, _ in mlp.adapter_parameters())[:2] == ["../output.dense.lora_shared_A",
                                                                  "../output.dense.lora_shared_B"]
    randomize(mlp)
    seen = {}
    hook = mlp.register_forward_pre_hook(lambda m, a: seen.setdefault("x", a[0].detach()))
    with mk.use_tasks(layer, torch.tensor([1, -1])):
        out = layer(x)
    hook.remove()
    out = out[0] if isinstance(out, tuple) else out
    att = seen["x"]  # the attention output: the MLP's input and the residual
    ffn = mlp(att, task_ids=torch.tensor([1, -1]))
    assert torch.allclose(out, layer.output.LayerNorm(ffn + att), atol=1e-6)
    assert not torch.allclose(out, ref)


def test_training_dropout_and_eval():
    mlp = mk.FusedMoELoRAMLP(llama_mlp(), num_tasks=3, r=4, alpha=8, dropout=0.3)
    randomize(mlp)
    check_dropout_seeding(mlp, torch.randn(4, 6, 12))


def test_protocol_add_tasks_set_trainable_merge():
    mlp = mk.FusedMoELoRAMLP(llama_mlp(), num_tasks=2, r=4, alpha=8, dropout=0.0, gate=False)
    randomize(mlp)
    assert mlp.num_tasks == 2 and len(mlp.lora_projections()) == 3
    mlp.set_trainable([1], shared=False, gate=False)
    for proj in mlp.lora_projections():  # set_trainable only turns on (mk.set_trainable freezes first)
        assert proj.lora_task_A[1].requires_grad
    for _, p in mlp.adapter_parameters():
        p.requires_grad_(False)
    mlp.set_trainable([1], shared=False)
    assert mlp.expert_trainable() == [False, True]
    mlp.add_tasks(1)
    assert mlp.num_tasks == 3 and mlp.expert_trainable() == [False, True, False]
    x = torch.randn(5, 12)
    with torch.no_grad():
        with torch.no_grad():
            for proj in mlp.lora_projections():
                proj.lora_shared_B.zero_()
        y_task1 = mlp(x, task_ids=1)
        mlp.merge_task(1)  # ungated: expert 1 folded into the base weights, exactly FFN_1 for t = -1
        assert rel_err(mlp(x, task_ids=-1), y_task1) < 1e-5
    gated = mk.FusedMoELoRAMLP(llama_mlp(), num_tasks=2, r=4)
    with pytest.raises(ValueError, match="merge_task needs a layer without a gate"):
        gated.merge_task(0)
    assert "activation=silu" in repr(gated) and "num_tasks=2" in repr(gated)


def test_unrecognised_mlp_and_activation_errors():
    class Fused(nn.Module):  # Phi-3 style fused gate_up_proj
        def __init__(self):
            super().__init__()
            self.gate_up_proj, self.down_proj = nn.Linear(8, 32), nn.Linear(16, 8)
            self.activation_fn = nn.SiLU()

    with pytest.raises(ValueError, match=r"module 'mlp' \(Fused\) is not an MLP FusedMoELoRAMLP recognises: it looked "
                                         r"for gate_proj/up_proj/down_proj.*children \['gate_up_proj', 'down_proj', "):
        mk.FusedMoELoRAMLP(Fused(), num_tasks=2)
    clip = FcMLP(act="quick_gelu")
    with pytest.raises(ValueError, match="activation QuickGELUActivation is not one the FFN op supports"):
        mk.FusedMoELoRAMLP(clip, num_tasks=2)
    with pytest.raises(ValueError, match="num_tasks must be >= 1"):
        mk.FusedMoELoRAMLP(llama_mlp(), num_tasks=0)
    mlp = mk.FusedMoELoRAMLP(llama_mlp(), num_tasks=2)
    with pytest.raises(ValueError, match="expects 12"):
        mlp(torch.randn(3, 11), task_ids=0)
    with pytest.raises(RuntimeError, match="part of a FusedMoELoRAMLP"):
        mlp.gate_proj(torch.randn(3, 12))
    with pytest.raises(mk.RoutingError, match="task_ids is missing"):
        mlp(torch.randn(3, 12))

"""Issue 24: what a new user (often a PEFT user) reaches for, and inputs that were silently misread.

Every test here failed before its fix: bad flags and ranks accepted, merges that counted a delta
twice or indexed from the end, an explicit backend choice overridden by the environment."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from transformers import LlamaConfig, LlamaForCausalLM

import moecl_kernels as mk


def tiny_llama(seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=64,
                                        max_position_embeddings=64)).to(dtype).eval()


def randomize(model, scale=0.1, seed=1):
    """Non-zero B for every expert (shared and task) of every projection."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_shared_B" in n or "lora_task_B" in n:
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * scale)


IDS = torch.randint(0, 64, (3, 7), generator=torch.Generator().manual_seed(5))


# --------------------------------------------------------------------------- item 6: types and ranges
@pytest.mark.parametrize("kw, msg", [
    (dict(r=100000), r"r=100000 exceeds min\(in_features, out_features\) = 32"),
    (dict(gate="False"), r"gate must be True or False, got 'False' \(str\)"),
    (dict(rslora="no"), r"rslora must be True or False, got 'no'"),
    (dict(deterministic=1), r"deterministic must be True or False, got 1 \(int\)"),
])
@pytest.mark.parametrize("level", ["linear", "ffn"])
def test_inject_checks_flag_types_and_the_rank(kw, msg, level):
    model = tiny_llama()
    before = {n: p.clone() for n, p in model.state_dict().items()}
    with pytest.raises(ValueError, match=msg):
        mk.inject(model, num_tasks=2, level=level, **kw)
    assert not mk.is_injected(model) and all(torch.equal(before[n], p) for n, p in model.state_dict().items())
    with pytest.raises(ValueError, match=msg):
        mk.FusedMoELoRALinear(nn.Linear(32, 48), 2, **kw)


# --------------------------------------------------------------------------- item 7: merge_task
@pytest.mark.parametrize("level", ["linear", "ffn"])
def test_merge_task_checks_the_index_counts_the_delta_once_and_can_be_undone(level):
    model = tiny_llama()
    mk.inject(model, num_tasks=3, gate=False, dropout=0.0, level=level)
    randomize(model)
    with torch.no_grad():
        ref = {t: model(IDS, task_ids=t).logits for t in (-1, 1)}
    base = {n: p.clone() for n, p in model.named_parameters() if n.endswith("weight")}
    layer = next(iter(mk.moe_layers(model).values()))
    for bad, msg in ((-1, r"task=-1 is out of range: this module has task experts 0\.\.2"), (5, "task=5 is out of range"),
                     ("1", "task must be an int")):
        with pytest.raises(ValueError, match=msg):
            layer.merge_task(bad)
    for lay in mk.moe_layers(model).values():
        lay.merge_task(1)
    assert layer.merged_tasks == [1]
    with torch.no_grad():
        merged_1 = model(IDS, task_ids=1).logits  # task 1's delta is in the base: not added a second time
        merged_none = model(IDS, task_ids=-1).logits  # ... and applies to every token now
    assert torch.allclose(merged_1, ref[1], rtol=0, atol=1e-10)
    assert torch.allclose(merged_none, ref[1], rtol=0, atol=1e-10)
    with pytest.raises(ValueError, match="already merged"):
        layer.merge_task(1)
    for lay in mk.moe_layers(model).values():
        lay.unmerge_task(1)
    assert layer.merged_tasks == []
    with torch.no_grad():
        assert torch.allclose(model(IDS, task_ids=-1).logits, ref[-1], rtol=0, atol=1e-10)
    assert all(torch.allclose(p, base[n], rtol=0, atol=1e-12) for n, p in model.named_parameters() if n in base)
    with pytest.raises(ValueError, match="task 1 is not merged"):
        layer.unmerge_task(1)


# --------------------------------------------------------------------------- item 15: explicit wins over env
def test_an_explicit_auto_backend_wins_over_the_environment(monkeypatch):
    model = tiny_llama(dtype=torch.float32)
    mk.inject(model, num_tasks=2)
    monkeypatch.setenv("MOECL_BACKEND", "cuda")  # cannot run CPU tensors
    with pytest.raises(mk.BackendUnavailableError):
        model(IDS, task_ids=0)
    mk.set_backend(model, "auto")
    model(IDS, task_ids=0)  # auto on CPU: eager
    mk.set_backend(model, None)  # None: the environment again
    with pytest.raises(mk.BackendUnavailableError):
        model(IDS, task_ids=0)
    fresh = mk.inject(tiny_llama(dtype=torch.float32), num_tasks=2, backend="auto")
    fresh(IDS, task_ids=0)

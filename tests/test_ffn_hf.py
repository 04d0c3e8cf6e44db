"""The FFN level in Hugging Face models (docs/spec.md §1.3, §2): inject(level="ffn") on tiny
Llama, Qwen2 and BERT models built from configs; routing, training, pooling, save/load, PEFT
import, compile."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import BertConfig, BertModel

import moecl_kernels as mk
from helpers import rel_err
from moecl_kernels.io import LoadError
from test_hf import FFN, check_compile_matches_eager, tiny_llama, tiny_qwen2


def tiny_bert(seed=0):
    torch.manual_seed(seed)
    return BertModel(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
                                vocab_size=64, max_position_embeddings=32)).eval()


def hidden(model, ids, **kw):
    out = model(ids, **kw)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def randomize(model, scale=0.1, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in mk.moe_layers(model).values():
            for proj in layer.lora_projections():
                for p in [proj.lora_shared_B, *proj.lora_task_B]:
                    p.copy_(torch.randn(p.shape, generator=g) * scale)


FACTORIES = [tiny_llama, tiny_qwen2, tiny_bert]


@pytest.mark.parametrize("factory", FACTORIES)
def test_inject_ffn_is_bit_exact_with_zero_B(factory):
    model = factory()
    ids = torch.randint(0, 64, (3, 11))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    with torch.no_grad():
        ref = hidden(model, ids, attention_mask=mask)
    mk.inject(model, num_tasks=3, r=4, alpha=8, dropout=0.05, level="ffn")
    layers = mk.moe_layers(model)
    assert len(layers) == 2 and all(isinstance(m, mk.FusedMoELoRAMLP) for m in layers.values())
    assert all(n.endswith(".mlp" if factory is not tiny_bert else ".intermediate") for n in layers)
    assert mk.config(model)["level"] == "ffn" and not any(m.training for m in layers.values())
    with torch.no_grad():
        out = hidden(model, ids, attention_mask=mask, task_ids=torch.tensor([0, 2, -1]))
    assert torch.equal(out, ref)


@pytest.mark.parametrize("factory", [tiny_llama, tiny_bert])
def test_mixed_batch_equals_per_task_batches(factory):
    model = factory()
    mk.inject(model, num_tasks=4, r=4, alpha=8, dropout=0.0, level="ffn")
    randomize(model)
    ids = torch.randint(0, 64, (4, 7))
    tasks = torch.tensor([3, 0, -1, 1])
    with torch.no_grad():
        mixed = hidden(model, ids, task_ids=tasks)
        single = torch.cat([hidden(model, ids[i:i + 1], task_ids=tasks[i:i + 1]) for i in range(4)])
    assert rel_err(mixed, single) < 1e-6


@pytest.mark.parametrize("factory", [tiny_llama, tiny_bert])
def test_training_one_task_changes_only_that_task(factory):
    model = factory()
    mk.inject(model, num_tasks=3, r=4, alpha=8, dropout=0.0, level="ffn")
    randomize(model)
    ids = torch.randint(0, 64, (3, 9))
    tasks = torch.tensor([0, 1, 2])
    with torch.no_grad():
        before = hidden(model, ids, task_ids=tasks)
    names = mk.set_trainable(model, task=1, shared=False, gate=False)
    assert names and all(".lora_task_A.1" in n or ".lora_task_B.1" in n for n in names)
    assert len(names) == 2 * 2 * (3 if factory is tiny_llama else 2)  # A and B, per projection, per MLP
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.01)
    model.train()
    hidden(model, ids[1:2], task_ids=torch.tensor([1])).pow(2).mean().backward()
    opt.step()
    model.eval()
    with torch.no_grad():
        after = hidden(model, ids, task_ids=tasks)
    assert torch.equal(after[0], before[0]) and torch.equal(after[2], before[2])
    assert not torch.equal(after[1], before[1])


def test_use_tasks_generate_and_add_tasks():
    model = tiny_llama()
    mk.inject(model, num_tasks=2, r=4, alpha=8, dropout=0.0, level="ffn")
    randomize(model, scale=0.5)
    ids = torch.randint(0, 64, (2, 5))
    with mk.use_tasks(model, torch.tensor([0, 1])):
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False, pad_token_id=0)
    seq = ids[1:2]
    for _ in range(3):
        with torch.no_grad():
            nxt = model(seq, task_ids=torch.tensor([1])).logits[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], 1)
    assert torch.equal(out[1], seq[0])
    with torch.no_grad():
        before = model(ids, task_ids=torch.tensor([0, 1])).logits
    assert mk.add_tasks(model, 2) == 4
    with torch.no_grad():
        assert torch.equal(model(ids, task_ids=torch.tensor([0, 1])).logits, before)
    with pytest.raises(mk.RoutingError, match="outside \\[-1, 3\\]"):
        model(ids, task_ids=torch.tensor([4, 0]))


@pytest.mark.parametrize("factory", [tiny_llama, tiny_bert])
def test_pooled_outputs_are_the_masked_mean_of_ffn_shared(factory):
    model = factory()
    mk.inject(model, num_tasks=2, r=4, alpha=8, dropout=0.0, level="ffn")
    randomize(model)
    name, mlp = list(mk.moe_layers(model).items())[1]
    ids = torch.randint(0, 64, (3, 6))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    captured = {}
    hook = mlp.register_forward_pre_hook(lambda m, a: captured.setdefault("x", a[0].detach()))
    mk.collect_pooled(model, True)
    hidden(model, ids, attention_mask=mask, task_ids=torch.tensor([0, 1, 1]))
    hook.remove()
    pooled = mk.pooled_outputs(model)
    assert set(pooled) == set(mk.moe_layers(model))
    # reference: FFN_shared(x) is the MLP with task id -1 (docs/spec.md §1.3), mean over attended tokens
    with torch.no_grad():
        ffn_s = mlp(captured["x"], task_ids=-1)
    w = mask.float() / mask.sum(1, keepdim=True)
    ref = torch.einsum("bs,bsd->bd", w, ffn_s)
    assert rel_err(pooled[name], ref) < 1e-5
    pooled[name].sum().backward()  # differentiable into the shared expert (all projections)
    assert all(p.lora_shared_A.grad is not None for p in mlp.lora_projections())
    ungated = tiny_llama()
    mk.inject(ungated, num_tasks=2, r=4, level="ffn", gate=False)
    with pytest.raises(ValueError, match="needs gate=True"):
        mk.collect_pooled(ungated, True)


def test_save_load_records_and_checks_the_level(tmp_path):
    model = tiny_bert()
    mk.inject(model, num_tasks=2, r=4, alpha=8, level="ffn")
    randomize(model)
    ids = torch.randint(0, 64, (2, 6))
    with torch.no_grad():
        ref = hidden(model, ids, task_ids=torch.tensor([0, 1]))
    mk.save(model, tmp_path / "a")
    fresh = tiny_bert()
    mk.load(fresh, tmp_path / "a")  # injects at the FFN level, BERT down projection included
    assert mk.config(fresh)["level"] == "ffn"
    with torch.no_grad():
        assert torch.equal(hidden(fresh, ids, task_ids=torch.tensor([0, 1])), ref)
    model.save_pretrained(tmp_path / "hf")
    again = tiny_bert()
    mk.load(again, tmp_path / "hf")
    with torch.no_grad():
        assert torch.equal(hidden(again, ids, task_ids=torch.tensor([0, 1])), ref)
    linear = tiny_bert()
    mk.inject(linear, target_modules=["intermediate.dense", "output.dense"], num_tasks=2, r=4, alpha=8)
    before = {n: p.clone() for n, p in linear.named_parameters()}
    with pytest.raises(LoadError, match="'level': \\('ffn', 'linear'\\)"):
        mk.load(linear, tmp_path / "a")
    assert all(torch.equal(p, before[n]) for n, p in linear.named_parameters())


def test_targets_name_mlps_or_their_projections_and_errors():
    model = tiny_llama()
    mk.inject(model, target_modules=FFN, num_tasks=2, level="ffn")  # projections stand for their MLP
    assert sorted(mk.moe_layers(model)) == ["model.layers.0.mlp", "model.layers.1.mlp"]
    with pytest.raises(ValueError, match="already injected"):
        mk.inject(model, num_tasks=2, level="ffn")
    model = tiny_llama()
    mk.inject(model, target_modules=r"model\.layers\.1\.mlp", num_tasks=2, level="ffn")
    assert list(mk.moe_layers(model)) == ["model.layers.1.mlp"]
    with pytest.raises(ValueError, match=r"module 'model.layers.0.self_attn' \(LlamaAttention\) is not an MLP "
                                         r"FusedMoELoRAMLP recognises: it looked for gate_proj/up_proj/down_proj"):
        mk.inject(tiny_llama(), target_modules=["self_attn"], num_tasks=2, level="ffn")
    with pytest.raises(ValueError, match="level='block' must be one of"):
        mk.inject(tiny_llama(), num_tasks=2, level="block")
    with pytest.raises(ValueError, match="found no MLP in Linear"):
        mk.inject(torch.nn.Linear(4, 4), num_tasks=2, level="ffn")


def test_peft_adapter_imports_into_an_ungated_ffn_level_model():
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=FFN, lora_dropout=0.0)
    pm = get_peft_model(tiny_llama(), cfg)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    ids = torch.randint(0, 64, (2, 9))
    with torch.no_grad():
        ref = pm.eval()(ids).logits
    model = tiny_llama()
    mk.inject(model, num_tasks=2, r=8, alpha=16, dropout=0.0, gate=False, level="ffn")
    covered = mk.import_peft_lora(model, pm, task=1)
    assert len(covered) == 6 and covered[0] == "model.layers.0.mlp.down_proj"
    with torch.no_grad():
        assert rel_err(model(ids, task_ids=1).logits, ref) <= 1e-5


def test_gradient_checkpointing_recomputes_with_the_call_routing():
    model = tiny_llama()
    mk.inject(model, num_tasks=3, r=4, alpha=8, dropout=0.0, level="ffn")
    randomize(model)
    mk.set_trainable(model, task=2)
    ids = torch.randint(0, 64, (2, 6))
    tasks = torch.tensor([2, 0])

    def grads():
        model.zero_grad(set_to_none=True)
        model(ids, task_ids=tasks).logits.pow(2).mean().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    model.train()
    plain = grads()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ckpt = grads()
    assert set(plain) == set(ckpt) and all(rel_err(ckpt[n], g) < 1e-6 for n, g in plain.items())


@pytest.mark.parametrize("compile_backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_torch_compile_fullgraph_matches_eager(compile_backend):
    torch._dynamo.reset()
    model = tiny_llama()
    mk.inject(model, num_tasks=3, r=4, alpha=8, dropout=0.0, level="ffn")
    randomize(model)
    mk.set_trainable(model, task=1)
    mk.collect_pooled(model, True)  # the pooled path compiles too
    check_compile_matches_eager(model, compile_backend)

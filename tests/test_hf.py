"""Hugging Face integration: inject, routing per forward, set_trainable, generate, compile, pooling."""

from __future__ import annotations

import pytest
import torch
from transformers import (BertConfig, BertModel, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM,
                          Qwen2Config, Qwen2ForCausalLM)

import moecl_kernels as mk
from helpers import rel_err

FFN = ["gate_proj", "up_proj", "down_proj"]


def tiny_llama(seed=0):
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=64,
                                        max_position_embeddings=64)).eval()


def tiny_qwen2(seed=0):
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(Qwen2Config(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=64,
                                        max_position_embeddings=64)).eval()


def randomize_B(model, scale=0.1, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in mk.moe_layers(model).values():
            for p in [layer.lora_shared_B, *layer.lora_task_B]:
                p.copy_(torch.randn(p.shape, generator=g) * scale)


@pytest.mark.parametrize("factory", [tiny_llama, tiny_qwen2])
def test_inject_is_bit_exact_with_zero_B(factory):
    model = factory()
    ids = torch.randint(0, 64, (3, 11))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    with torch.no_grad():
        ref = model(ids, attention_mask=mask).logits
    mk.inject(model, target_modules=FFN, num_tasks=3, r=4, alpha=8, dropout=0.05, gate=True)
    assert len(mk.moe_layers(model)) == 6
    assert not any(layer.training for layer in mk.moe_layers(model).values())  # eval mode kept
    with torch.no_grad():
        out = model(ids, attention_mask=mask, task_ids=torch.tensor([0, 2, -1])).logits
    assert torch.equal(out, ref)


@pytest.mark.parametrize("factory", [tiny_llama, tiny_qwen2])
def test_training_one_task_changes_only_that_task(factory):
    model = factory()
    mk.inject(model, target_modules=FFN, num_tasks=3, r=4, alpha=8, dropout=0.0)
    randomize_B(model)
    ids = torch.randint(0, 64, (3, 9))
    tasks = torch.tensor([0, 1, 2])
    with torch.no_grad():
        before = model(ids, task_ids=tasks).logits
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if ".lora_task_" in n and not n.endswith(".1")}
    # expert 1 only: other tasks' outputs must not move at all
    names = mk.set_trainable(model, task=1, shared=False, gate=False)
    assert names and all(".lora_task_A.1" in n or ".lora_task_B.1" in n for n in names)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.01)
    model.train()
    loss = model(ids[1:2], task_ids=torch.tensor([1]), labels=ids[1:2]).loss
    loss.backward()
    assert all(p.grad is None for n, p in model.named_parameters() if n in frozen)
    opt.step()
    model.eval()
    with torch.no_grad():
        after = model(ids, task_ids=tasks).logits
    assert torch.equal(after[0], before[0]) and torch.equal(after[2], before[2])
    assert not torch.equal(after[1], before[1])
    # default set_trainable (shared + gate + expert k, AdamW with weight decay): other experts untouched
    mk.set_trainable(model, task=2)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.01)
    model.train()
    model(ids, task_ids=torch.tensor([2, 2, 2]), labels=ids).loss.backward()
    opt.step()
    for n, p in model.named_parameters():
        if n in frozen and not n.endswith(".2"):
            assert torch.equal(p, frozen[n]), n


def test_mixed_batch_equals_per_task_batches():
    model = tiny_llama()
    mk.inject(model, target_modules=FFN, num_tasks=4, r=4, alpha=8, dropout=0.0)
    randomize_B(model)
    ids = torch.randint(0, 64, (4, 7))
    tasks = torch.tensor([3, 0, -1, 1])
    with torch.no_grad():
        mixed = model(ids, task_ids=tasks).logits
        single = torch.cat([model(ids[i:i + 1], task_ids=tasks[i:i + 1]).logits for i in range(4)])
    assert rel_err(mixed, single) < 1e-6


def test_generate_with_use_tasks():
    model = tiny_llama()
    mk.inject(model, target_modules=FFN, num_tasks=2, r=4, alpha=8, dropout=0.0)
    randomize_B(model, scale=0.5)
    ids = torch.randint(0, 64, (2, 5))
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    with mk.use_tasks(model, torch.tensor([0, 1])):
        out = model.generate(ids, attention_mask=torch.ones_like(ids), **kw)
    with mk.use_tasks(model, torch.tensor([0, 0])):
        out0 = model.generate(ids, attention_mask=torch.ones_like(ids), **kw)
    # greedy decode by hand with explicit task ids, no KV cache
    seq = ids[1:2]
    for _ in range(4):
        with torch.no_grad():
            nxt = model(seq, task_ids=torch.tensor([1])).logits[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], 1)
    assert torch.equal(out[1], seq[0])
    assert torch.equal(out[0], out0[0])
    with pytest.raises(mk.RoutingError, match="task_ids is missing"):
        model(ids)


def test_encoder_bert_and_gpt2_conv1d_error():
    torch.manual_seed(0)
    bert = BertModel(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
                                vocab_size=64, max_position_embeddings=32)).eval()
    ids = torch.randint(0, 64, (2, 6))
    with torch.no_grad():
        ref = bert(ids).last_hidden_state
    mk.inject(bert, target_modules=["intermediate.dense", "output.dense"], num_tasks=2, r=4, alpha=8)
    assert len(mk.moe_layers(bert)) == 6  # intermediate.dense, output.dense and attention.output.dense x 2
    with torch.no_grad():
        assert torch.equal(bert(ids, task_ids=torch.tensor([0, 1])).last_hidden_state, ref)
    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64, n_positions=32)).eval()
    with torch.no_grad():
        ref = gpt2(ids).logits
    mk.inject(gpt2, target_modules=["c_fc"], num_tasks=2)  # a GPT-2 Conv1D (test_user_habits.py has more)
    with torch.no_grad():
        assert torch.allclose(gpt2(ids, task_ids=0).logits, ref, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="matched no nn.Linear"):
        mk.inject(tiny_llama(), target_modules=["nope_proj"], num_tasks=2)


def test_add_tasks_model_wide():
    model = tiny_llama()
    mk.inject(model, target_modules=FFN, num_tasks=2, r=4, alpha=8, dropout=0.0)
    randomize_B(model)
    ids = torch.randint(0, 64, (2, 5))
    with torch.no_grad():
        before = model(ids, task_ids=torch.tensor([0, 1])).logits
    assert mk.add_tasks(model, 2) == 4
    with torch.no_grad():
        assert torch.equal(model(ids, task_ids=torch.tensor([0, 1])).logits, before)
        model(ids, task_ids=torch.tensor([3, 2]))
    with pytest.raises(mk.RoutingError, match="outside \\[-1, 3\\]"):
        model(ids, task_ids=torch.tensor([4, 0]))


def test_pooled_outputs_match_reference_and_cost_nothing_when_off():
    model = tiny_llama()
    mk.inject(model, target_modules=FFN, num_tasks=2, r=4, alpha=8, dropout=0.0)
    randomize_B(model)
    ids = torch.randint(0, 64, (3, 6))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    model(ids, attention_mask=mask, task_ids=torch.tensor([0, 1, 1]))
    assert mk.pooled_outputs(model) == {}
    captured = {}
    name = "model.layers.1.mlp.down_proj"
    layer = mk.moe_layers(model)[name]
    h = layer.register_forward_pre_hook(lambda m, a: captured.setdefault("x", a[0].detach()))
    mk.collect_pooled(model, True)
    model(ids, attention_mask=mask, task_ids=torch.tensor([0, 1, 1]))
    h.remove()
    pooled = mk.pooled_outputs(model)
    assert set(pooled) == set(mk.moe_layers(model))
    w = mask.double() / mask.sum(1, keepdim=True)
    ref = mk.ops.pooled_shared_reference(captured["x"].double(), w, layer.weight.double(), None,
                                         layer.lora_shared_A.double(), layer.lora_shared_B.double(), layer.scaling)
    assert rel_err(pooled[name], ref) < 1e-6
    pooled[name].sum().backward()  # differentiable into the shared expert
    assert layer.lora_shared_A.grad is not None
    mk.collect_pooled(model, True, modules=[name])
    model(ids, attention_mask=mask, task_ids=torch.tensor([0, 1, 1]))
    assert list(mk.pooled_outputs(model)) == [name]


@pytest.mark.parametrize("compile_backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph_matches_eager(compile_backend):
    """The whole injected model, task_ids= kwarg and routing included, compiles as one graph."""
    torch._dynamo.reset()
    model = tiny_llama()
    mk.inject(model, target_modules=FFN, num_tasks=3, r=4, alpha=8, dropout=0.0)
    randomize_B(model)
    mk.set_trainable(model, task=1)
    check_compile_matches_eager(model, compile_backend)


def check_compile_matches_eager(model, compile_backend):
    """Logits and trainable gradients of torch.compile(model, fullgraph=True) equal eager's."""
    ids = torch.randint(0, 64, (2, 8))
    tasks = torch.tensor([1, 2])

    def step(m):
        model.zero_grad(set_to_none=True)
        out = m(ids, task_ids=tasks).logits
        out.pow(2).mean().backward()
        return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    eager_out, eager_grads = step(model)
    out, grads = step(torch.compile(model, fullgraph=True, backend=compile_backend))
    assert rel_err(out, eager_out) < 1e-5
    assert set(grads) == set(eager_grads)
    for n, g in eager_grads.items():
        assert rel_err(grads[n], g) < 1e-4, n

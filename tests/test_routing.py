"""Routing lives for one call (docs/spec.md, "Routing"): submodule calls, encoder-decoder
generate, activation checkpointing, copies and pickling, shape checks, HF Trainer,
save_pretrained, and the argument checks of the integration API."""

from __future__ import annotations

import copy
import io
import logging
import pickle
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint
from transformers import T5Config, T5ForConditionalGeneration

import moecl_kernels as mk
from helpers import rel_err
from moecl_kernels.routing import active_contexts
from test_hf import FFN, randomize_B, tiny_llama


def injected(num_tasks=3, dropout=0.0, seed=0, **kw):
    m = tiny_llama(seed)
    mk.inject(m, target_modules=FFN, num_tasks=num_tasks, r=4, alpha=8, dropout=dropout, **kw)
    randomize_B(m, scale=0.3)
    return m


def grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


# ----------------------------------------------------------------------------- one call, one routing
def test_submodule_call_routes_by_its_own_ids_and_nothing_outlives_a_call():
    m = injected()
    ids = torch.randint(0, 64, (2, 7))
    with torch.no_grad():
        full0 = m(ids, task_ids=0).logits
        m(ids, task_ids=1)  # an earlier call with other ids must not leak into the next one
        inner0 = m.lm_head(m.model(ids, task_ids=0).last_hidden_state)
        assert torch.equal(inner0, full0)
        assert active_contexts() == []
        with pytest.raises(mk.RoutingError, match="task_ids is missing"):
            m.model(ids)
        with pytest.raises(mk.RoutingError, match="task_ids is missing"):
            m(ids)
        # a decoder layer (deep submodule) called on its own with task_ids=
        layer = m.model.layers[0].mlp
        h = torch.randn(2, 7, 32)
        a = layer(h, task_ids=torch.tensor([2, 0]))
        b = torch.cat([layer(h[:1], task_ids=2), layer(h[1:], task_ids=0)])
        assert rel_err(a, b) < 1e-6


def test_routing_is_dropped_when_the_call_raises():
    m = injected()
    ids = torch.randint(0, 64, (2, 5))
    with pytest.raises(Exception):
        m(ids, task_ids=0, attention_mask=torch.ones(2, 5, 3))  # HF fails inside the forward
    assert active_contexts() == []
    with pytest.raises(mk.RoutingError, match="task id 7"):
        m(ids, task_ids=torch.tensor([7, 0]))
    assert active_contexts() == []
    with pytest.raises(mk.RoutingError, match="task_ids is missing"):
        m(ids)


def test_use_tasks_does_not_route_another_injected_model():
    student, teacher = injected(seed=0), injected(seed=1)
    ids = torch.randint(0, 64, (2, 5))
    with torch.no_grad(), mk.use_tasks(student, torch.tensor([0, 1])):
        student(ids)
        with pytest.raises(mk.RoutingError, match="task_ids is missing"):
            teacher(ids)
        teacher(ids, task_ids=2)  # its own ids work inside the block


def tiny_t5():
    torch.manual_seed(0)
    cfg = T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=2, num_heads=4,
                   decoder_start_token_id=0, pad_token_id=0, eos_token_id=1, dropout_rate=0.0)
    return T5ForConditionalGeneration(cfg).eval()


def test_encoder_decoder_generate_uses_the_ids_in_force():
    m = tiny_t5()
    mk.inject(m, target_modules=["wi", "wo"], num_tasks=2, r=4, alpha=8, dropout=0.0)
    randomize_B(m, scale=0.5)
    ids = torch.randint(2, 64, (2, 6))
    kw = dict(max_new_tokens=4, do_sample=False, min_new_tokens=4)
    with torch.no_grad():
        m(input_ids=ids, decoder_input_ids=torch.zeros(2, 1, dtype=torch.long), task_ids=1)  # stale ids, if any
        with mk.use_tasks(m, torch.tensor([0, 0])):
            out = m.generate(ids, **kw)
        # greedy by hand, every call with explicit ids
        dec = torch.zeros(2, 1, dtype=torch.long)
        for _ in range(4):
            logits = m(input_ids=ids, decoder_input_ids=dec, task_ids=torch.tensor([0, 0])).logits
            dec = torch.cat([dec, logits[:, -1].argmax(-1, keepdim=True)], 1)
        enc0 = m.encoder(ids, task_ids=0).last_hidden_state
        enc1 = m.encoder(ids, task_ids=1).last_hidden_state
    assert torch.equal(out, dec)
    assert not torch.allclose(enc0, enc1)


def test_generate_with_beams_expands_per_sequence_ids():
    m = injected(num_tasks=2)
    ids = torch.randint(0, 64, (2, 5))
    kw = dict(max_new_tokens=3, do_sample=False, num_beams=2, pad_token_id=0)
    with torch.no_grad():
        with mk.use_tasks(m, torch.tensor([0, 1])):
            both = m.generate(ids, attention_mask=torch.ones_like(ids), **kw)
        with mk.use_tasks(m, torch.tensor([1])):
            second = m.generate(ids[1:], attention_mask=torch.ones_like(ids[1:]), **kw)
    assert torch.equal(both[1], second[0])


# ----------------------------------------------------------------------------- activation checkpointing
@pytest.mark.parametrize("reentrant", [True, False])
def test_hf_gradient_checkpointing_recomputes_with_the_original_routing(reentrant):
    m = injected(dropout=0.1)
    mk.set_trainable(m, task=[0, 1])
    m.train()
    a, b = torch.randint(0, 64, (2, 6)), torch.randint(0, 64, (2, 6))

    def run():
        m.zero_grad(set_to_none=True)
        torch.manual_seed(3)
        loss = m(a, task_ids=0, labels=a).loss + m(b, task_ids=1, labels=b).loss
        loss.backward()
        return loss.detach(), grads(m)

    ref_loss, ref = run()
    m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    m.config.use_cache = False
    loss, got = run()
    assert torch.equal(loss, ref_loss)
    assert set(got) == set(ref)
    for n in ref:
        assert rel_err(got[n], ref[n]) < 1e-6, n
    assert active_contexts() == []


@pytest.mark.parametrize("reentrant", [True, False])
def test_torch_checkpoint_of_a_block_inside_a_routed_call(reentrant):
    """A user's own module that checkpoints an injected block; backward after the call ended."""
    class Wrapper(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, ids):
            h = self.inner.model.embed_tokens(ids).detach().requires_grad_()  # reentrant mode needs a grad input
            h = checkpoint(self.inner.model.layers[0].mlp, h, use_reentrant=reentrant)
            return h.pow(2).mean()

    m = injected()
    mk.set_trainable(m, task=[0, 1, 2])
    w = Wrapper(m)  # not injected itself: its calls route through use_tasks
    a = torch.randint(0, 64, (2, 5))
    m.zero_grad(set_to_none=True)
    with mk.use_tasks(w, torch.tensor([0, 2])):
        la = w(a)
    with mk.use_tasks(w, torch.tensor([1, 1])):
        lb = w(a)
    (la + lb).backward()  # both blocks recompute after their use_tasks blocks ended
    got = grads(m)
    # reference without checkpointing: the same two routed calls of the block itself
    m.zero_grad(set_to_none=True)
    h = m.model.embed_tokens(a).detach().requires_grad_()
    (m.model.layers[0].mlp(h, task_ids=torch.tensor([0, 2])).pow(2).mean()
     + m.model.layers[0].mlp(h, task_ids=1).pow(2).mean()).backward()
    ref = grads(m)
    assert set(got) == set(ref)
    for n in ref:
        assert rel_err(got[n], ref[n]) < 1e-6, n


# ----------------------------------------------------------------------------- copies and pickling
def test_deepcopy_and_pickle_route_by_their_own_calls(tmp_path):
    m = injected()
    ids = torch.randint(0, 64, (2, 6))
    with torch.no_grad():
        ref = m(ids, task_ids=torch.tensor([0, 2])).logits
        c = copy.deepcopy(m)
        m(ids, task_ids=1)
        assert torch.equal(c(ids, task_ids=torch.tensor([0, 2])).logits, ref)
        with pytest.raises(mk.RoutingError, match="task_ids is missing"):
            c(ids)
        for layer in mk.moe_layers(c).values():  # the copy's experts are its own
            layer.lora_task_B[0].add_(1.0)
        assert torch.equal(m(ids, task_ids=torch.tensor([0, 2])).logits, ref)
        p = pickle.loads(pickle.dumps(m))
        assert torch.equal(p(ids, task_ids=torch.tensor([0, 2])).logits, ref)
        buf = io.BytesIO()
        torch.save(m, buf)
        buf.seek(0)
        t = torch.load(buf, weights_only=False)
        assert torch.equal(t(ids, task_ids=torch.tensor([0, 2])).logits, ref)
        with pytest.raises(mk.RoutingError, match="task_ids is missing"):
            t(ids)


def test_deepcopy_and_pickle_with_pooled_outputs_held():
    m = injected()
    mk.collect_pooled(m, True)
    m(torch.randint(0, 64, (2, 6)), task_ids=torch.tensor([0, 1]))  # pooled outputs hold a graph
    assert mk.pooled_outputs(m)
    c = copy.deepcopy(m)
    assert mk.pooled_outputs(c) == {}
    pickle.dumps(m)


# ----------------------------------------------------------------------------- shapes
def test_task_ids_must_match_the_batch():
    m = injected()
    ids = torch.randint(0, 64, (4, 6))
    with torch.no_grad():
        with pytest.raises(mk.RoutingError, match=r"task_ids has shape \[2\] but the input's tokens are \[4, 6\]"):
            m(ids, task_ids=torch.tensor([0, 1]))
        with pytest.raises(mk.RoutingError, match=r"task_ids has shape \[6, 4\] but the input's tokens are \[4, 6\]"):
            m(ids, task_ids=torch.zeros(6, 4, dtype=torch.long))
        per_token = torch.randint(-1, 3, (4, 6))
        a = m(ids, task_ids=per_token).logits
        assert a.shape == (4, 6, 64)
        b = m(ids, task_ids=np.int64(2)).logits
        c = m(ids, task_ids=torch.tensor(2)).logits
        d = m(ids, task_ids=[np.int64(2)] * 4).logits
        assert torch.equal(b, c) and torch.equal(b, d)
        with pytest.raises(mk.RoutingError, match="task_ids must hold integer task ids"):
            m(ids, task_ids=torch.zeros(4))


def test_use_tasks_checks_its_attention_mask():
    m = injected()
    with pytest.raises(mk.RoutingError, match=r"attention_mask has shape \[3, 5\] but task_ids has 2 sequences"):
        with mk.use_tasks(m, torch.tensor([0, 1]), attention_mask=torch.ones(3, 5)):
            pass
    with pytest.raises(mk.RoutingError, match="attention_mask must be a \\[batch, seq\\] tensor"):
        with mk.use_tasks(m, torch.tensor([0, 1]), attention_mask=torch.ones(2, 1, 5, 5)):
            pass


# ----------------------------------------------------------------------------- HF Trainer, save_pretrained
def test_hf_trainer_with_a_task_ids_column(tmp_path):
    from transformers import Trainer, TrainingArguments

    m = injected(num_tasks=2)
    mk.set_trainable(m, task=1, shared=False, gate=False)
    before = {n: p.detach().clone() for n, p in m.named_parameters() if p.requires_grad}
    data = [{"input_ids": torch.randint(0, 64, (6,)).tolist(), "task_ids": 1} for _ in range(4)]
    for d in data:
        d["labels"] = d["input_ids"]
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2, learning_rate=1e-2,
                             remove_unused_columns=False, report_to=[], use_cpu=True, save_strategy="no",
                             logging_steps=1, disable_tqdm=True)
    m.train()
    Trainer(model=m, args=args, train_dataset=data).train()
    moved = [n for n, p in m.named_parameters() if n in before and not torch.equal(p, before[n])]
    assert moved and all(".lora_task_A.1" in n or ".lora_task_B.1" in n for n in moved)


def test_save_pretrained_round_trip_through_mk_load(tmp_path):
    from transformers import LlamaForCausalLM

    m = injected()
    ids = torch.randint(0, 64, (2, 6))
    with torch.no_grad():
        ref = m(ids, task_ids=torch.tensor([0, 2])).logits
    m.save_pretrained(tmp_path / "hf")
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    hf_logger = logging.getLogger("transformers")
    hf_logger.addHandler(handler)
    try:
        plain = LlamaForCausalLM.from_pretrained(tmp_path / "hf").eval()
    finally:
        hf_logger.removeHandler(handler)
    assert not mk.is_injected(plain)
    report = "\n".join(r.getMessage() for r in records if r.levelno >= logging.WARNING)
    assert "lora_shared_A" in report and "UNEXPECTED" in report  # HF's load report names the adapter weights
    mk.load(plain, tmp_path / "hf")
    with torch.no_grad():
        assert torch.equal(plain(ids, task_ids=torch.tensor([0, 2])).logits, ref)


# ----------------------------------------------------------------------------- argument checks
def test_integration_argument_checks():
    with pytest.raises(ValueError, match="r must be an integer, got 2.5"):
        mk.inject(tiny_llama(), target_modules=FFN, num_tasks=2, r=2.5)
    with pytest.raises(ValueError, match="num_tasks must be an integer, got 1.7"):
        mk.inject(tiny_llama(), target_modules=FFN, num_tasks=1.7)
    with pytest.raises(ValueError, match="alpha must be > 0"):
        mk.inject(tiny_llama(), target_modules=FFN, num_tasks=2, alpha=-16)
    with pytest.raises(ValueError, match=r"target_modules names \['vproj'\] that match no nn.Linear"):
        mk.inject(tiny_llama(), target_modules=["q_proj", "vproj"], num_tasks=2)
    m = injected()
    assert mk.set_trainable(m, task=np.int64(1)) == mk.set_trainable(m, task=torch.tensor(1))
    with pytest.raises(ValueError, match="task must be an int or a list of ints"):
        mk.set_trainable(m, task=1.5)
    with pytest.raises(ValueError, match="backend='nope' is unknown"):
        mk.set_backend(m, "nope")
    mk.set_trainable(m, task=1)
    mk.add_tasks(m, 2)
    layer = next(iter(mk.moe_layers(m).values()))
    assert layer.expert_trainable() == [False, True, False, False, False]  # new experts start frozen


def test_api_on_an_outer_module_around_an_injected_one(tmp_path):
    class Outer(nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone = injected()
            self.head = nn.Linear(64, 2)

    o = Outer()
    names = mk.set_trainable(o, task=1)
    assert names and all(n.startswith("backbone.") for n in names)
    mk.save(o, tmp_path / "a")
    o2 = Outer()
    o2.backbone = tiny_llama()
    mk.load(o2, tmp_path / "a")
    ids = torch.randint(0, 64, (2, 5))
    with torch.no_grad():
        assert torch.equal(o2.backbone(ids, task_ids=1).logits, o.backbone(ids, task_ids=1).logits)


def test_import_peft_lora_warns_when_not_exact():
    from test_peft_io import peft_with_adapters
    from test_hf import tiny_qwen2

    pm = peft_with_adapters(tiny_qwen2, ["default"], r=4, alpha=8)
    gated = tiny_qwen2()
    mk.inject(gated, target_modules=FFN, num_tasks=2, r=4, alpha=8, dropout=0.0, gate=True)
    with pytest.warns(UserWarning, match="have a gate"):
        mk.import_peft_lora(gated, pm, task=np.int64(1))
    plain = tiny_qwen2()
    mk.inject(plain, target_modules=FFN, num_tasks=2, r=4, alpha=8, dropout=0.0, gate=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mk.import_peft_lora(plain, pm, task=0)

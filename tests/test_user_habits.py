"""Issue 24: what a new user (often a PEFT user) reaches for, and inputs that were silently misread.

Every test here failed before its fix: bad flags and ranks accepted, merges that counted a delta
twice or indexed from the end, an explicit backend choice overridden by the environment."""

from __future__ import annotations

import json

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


# --------------------------------------------------------------------------- items 3, 4 and load's default
def tiny_bert_classifier(seed=0):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    return BertForSequenceClassification(BertConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=64, num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)).eval()


@pytest.mark.parametrize("level", ["linear", "ffn"])
def test_modules_to_save_are_trained_saved_and_loaded(tmp_path, level):
    model = tiny_bert_classifier()
    targets = ["intermediate.dense", "output.dense"] if level == "linear" else None
    mk.inject(model, target_modules=targets, num_tasks=2, level=level, modules_to_save=["classifier"])
    assert all(p.requires_grad for p in model.classifier.parameters())
    assert "classifier.weight" in mk.set_trainable(model, task=0)
    with torch.no_grad():
        model.classifier.weight.add_(1.0)  # "trained"
    ref = model(IDS, task_ids=0).logits
    mk.save(model, tmp_path / "a")
    assert mk.config(model)["modules_to_save"] == ["classifier"]
    fresh = tiny_bert_classifier()  # the same base, its head at random init
    mk.load(fresh, tmp_path / "a")
    assert torch.equal(fresh.classifier.weight, model.classifier.weight)
    assert torch.equal(fresh(IDS, task_ids=0).logits, ref)
    model.save_pretrained(tmp_path / "hf")
    again = mk.load(tiny_bert_classifier(), tmp_path / "hf")
    assert torch.equal(again(IDS, task_ids=0).logits, ref)
    with pytest.raises(ValueError, match=r"modules_to_save names \['head'\] that match no module"):
        mk.inject(tiny_bert_classifier(), num_tasks=2, level="ffn", modules_to_save=["head"])


def test_load_defaults_to_inference_and_trainable_true_trains(tmp_path):
    model = tiny_llama()
    mk.inject(model, num_tasks=2)
    mk.save(model, tmp_path / "a")
    inf = tiny_llama().train()
    mk.load(inf, tmp_path / "a")
    assert not inf.training and not any(p.requires_grad for p in inf.parameters())
    tr = tiny_llama().train()
    mk.load(tr, tmp_path / "a", trainable=True)
    assert tr.training and all(p.requires_grad for n, p in tr.named_parameters() if "lora_" in n or "moe_gate" in n)
    with pytest.raises(ValueError, match="trainable must be True or False"):
        mk.load(tiny_llama(), tmp_path / "a", trainable="yes")


@pytest.mark.parametrize("level", ["linear", "ffn"])
def test_a_merged_task_survives_save_and_load(tmp_path, level):
    model = tiny_llama()
    mk.inject(model, num_tasks=3, gate=False, dropout=0.0, level=level)
    randomize(model)
    for layer in mk.moe_layers(model).values():
        layer.merge_task(1)
    with torch.no_grad():
        ref = {t: model(IDS, task_ids=t).logits for t in (-1, 1, 2)}
    mk.save(model, tmp_path / "a")
    fresh = mk.load(tiny_llama(), tmp_path / "a")
    assert all(m.merged_tasks == [1] for m in mk.moe_layers(fresh).values())
    with torch.no_grad():
        for t, r in ref.items():
            assert torch.allclose(fresh(IDS, task_ids=t).logits, r, rtol=0, atol=1e-12)
    with pytest.raises(mk.io.LoadError, match="merged into its base weights"):
        mk.load(fresh, tmp_path / "a")  # its base is no longer the plain one


def test_save_onto_a_file_is_one_line_naming_it(tmp_path):
    model = mk.inject(tiny_llama(), num_tasks=2)
    (tmp_path / "f").write_text("x")
    with pytest.raises(ValueError, match=r"path '.*f' is a file: mk.save writes a folder"):
        mk.save(model, tmp_path / "f")
    assert (tmp_path / "f").read_text() == "x"


# --------------------------------------------------------------------------- PEFT parity
def test_print_trainable_parameters(capsys):
    model = mk.inject(tiny_llama(), num_tasks=2)
    mk.set_trainable(model, task=1)
    n, total = mk.print_trainable_parameters(model)
    assert n == sum(p.numel() for p in model.parameters() if p.requires_grad) and 0 < n < total
    assert capsys.readouterr().out.strip() == (f"trainable params: {n:,d} || all params: {total:,d} || "
                                               f"trainable%: {100 * n / total:.4f}")


@pytest.mark.parametrize("level", ["linear", "ffn"])
def test_disable_adapters_is_the_base_model_exactly(level):
    model = tiny_llama()
    with torch.no_grad():
        base = model(IDS).logits
    mk.inject(model, num_tasks=2, gate=True, level=level)
    randomize(model)
    with torch.no_grad():
        assert not torch.equal(model(IDS, task_ids=-1).logits, base)  # the shared expert alone changes it
        with mk.disable_adapters(model):
            assert torch.equal(model(IDS).logits, base)  # no routing needed, no shared expert either
        assert not torch.equal(model(IDS, task_ids=0).logits, base)


def test_disable_adapters_on_a_bert_style_layer_is_exact():
    model = tiny_bert_classifier()
    with torch.no_grad():
        base = model(IDS).logits
    mk.inject(model, num_tasks=2, level="ffn")
    randomize(model)
    with torch.no_grad(), mk.disable_adapters(model):
        assert torch.equal(model(IDS).logits, base)


@pytest.mark.parametrize("factory, level", [(tiny_llama, "linear"), (tiny_llama, "ffn"),
                                            (tiny_bert_classifier, "ffn")])
def test_unload_gives_the_plain_model_back(factory, level):
    model = factory()
    with torch.no_grad():
        base = model(IDS).logits
    plain_names = sorted(n for n, _ in model.named_modules())
    targets = "all-linear" if level == "linear" else None
    mk.inject(model, target_modules=targets, num_tasks=2, level=level)
    randomize(model)
    assert mk.unload(model) is model
    assert not mk.is_injected(model) and sorted(n for n, _ in model.named_modules()) == plain_names
    assert not hasattr(model.config, "moecl") and "_moecl_config" not in model.__dict__
    assert not any(m._forward_pre_hooks for m in model.modules())
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, base)
    mk.inject(model, num_tasks=2, level=level)  # and it can be injected again


@pytest.mark.parametrize("level", ["linear", "ffn"])
@pytest.mark.parametrize("task", [None, 2])
def test_merge_and_unload_computes_what_the_routed_model_did(level, task):
    model = tiny_llama()
    mk.inject(model, num_tasks=3, gate=False, dropout=0.0, level=level)
    randomize(model)
    with torch.no_grad():
        ref = model(IDS, task_ids=-1 if task is None else task).logits
    mk.merge_and_unload(model, task=task)
    assert not mk.is_injected(model)
    with torch.no_grad():
        assert torch.allclose(model(IDS).logits, ref, rtol=0, atol=1e-10)


def test_merge_and_unload_refuses_a_gated_model_saying_why():
    model = mk.inject(tiny_llama(), num_tasks=2, gate=True)
    with pytest.raises(ValueError, match="merge_and_unload needs gate=False: .* per-token weights"):
        mk.merge_and_unload(model, task=0)
    assert mk.is_injected(model)


def test_all_linear_targets_every_linear_of_the_blocks_not_the_head():
    model = mk.inject(tiny_llama(), target_modules="all-linear", num_tasks=2)
    names = set(mk.moe_layers(model))
    assert "lm_head" not in names and len(names) == 2 * 7  # q, k, v, o, gate, up, down per block
    bert = mk.inject(tiny_bert_classifier(), target_modules="all-linear", num_tasks=2)
    assert not any(n.startswith(("classifier", "bert.pooler")) for n in mk.moe_layers(bert))


# --------------------------------------------------------------------------- item 8
def test_use_tasks_mask_of_the_wrong_shape_is_an_error_not_ignored():
    model = mk.inject(tiny_llama(), num_tasks=2)
    mk.collect_pooled(model, True)
    for bad in (torch.ones(3, 9), torch.ones(7, 3)):
        with pytest.raises(mk.RoutingError, match=r"attention_mask has shape \[\d, \d\] but the first forward .* "
                                                  r"has tokens \[3, 7\]"):
            with mk.use_tasks(model, 0, attention_mask=bad):
                model(IDS)
    mask = torch.ones(3, 7)
    mask[0, :3] = 0
    with torch.no_grad():
        with mk.use_tasks(model, torch.tensor([0, 1, 0]), attention_mask=mask):
            model(IDS, attention_mask=mask)
        pooled = mk.pooled_outputs(model)
        model(IDS, attention_mask=mask, task_ids=torch.tensor([0, 1, 0]))
        assert all(torch.equal(pooled[k], v) for k, v in mk.pooled_outputs(model).items())
        with mk.use_tasks(model, torch.tensor([0, 1, 0]), attention_mask=mask):
            model.generate(IDS, attention_mask=mask, max_new_tokens=3, do_sample=False, num_beams=2)


# --------------------------------------------------------------------------- item 11
def test_generate_takes_task_ids_and_routes_like_use_tasks():
    import copy
    import pickle

    model = mk.inject(tiny_llama(dtype=torch.float32), num_tasks=2)
    randomize(model, scale=0.5)
    t = torch.tensor([0, 1, 1])
    kw = dict(max_new_tokens=4, do_sample=False)
    with mk.use_tasks(model, t):
        ref = model.generate(IDS, **kw)
    assert torch.equal(model.generate(IDS, task_ids=t, **kw), ref)
    with mk.use_tasks(model, t):
        beams = model.generate(IDS, num_beams=2, **kw)
    assert torch.equal(model.generate(IDS, task_ids=t, num_beams=2, **kw), beams)
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert torch.equal(clone.generate(IDS, task_ids=t, **kw), ref)
    with pytest.raises(mk.RoutingError, match="task_ids is missing"):
        model.generate(IDS, **kw)
    mk.unload(model)
    assert "generate" not in model.__dict__


# --------------------------------------------------------------------------- item 12
def test_hf_trainer_without_the_task_column_names_remove_unused_columns(tmp_path):
    pytest.importorskip("accelerate")
    from transformers import Trainer, TrainingArguments

    model = mk.inject(tiny_llama(dtype=torch.float32), num_tasks=2)
    rows = [{"input_ids": IDS[i], "labels": IDS[i], "task_ids": i % 2} for i in range(3)]
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=3, max_steps=1, report_to=[],
                             use_cpu=True, save_strategy="no")
    with pytest.raises(mk.RoutingError, match=r"TrainingArguments\(remove_unused_columns=False\)"):
        Trainer(model=model, args=args, train_dataset=rows).train()
    args.remove_unused_columns = False
    Trainer(model=model, args=args, train_dataset=rows).train()  # the documented fix works


# --------------------------------------------------------------------------- item 14: one line naming the file or value
def test_check_cli_bad_device_and_backend_are_one_line(capsys):
    from moecl_kernels import cli

    for argv, msg in ((["check", "--backends", "nope"], "--backends: unknown backend(s) ['nope']"),
                      (["check", "--device", "tpu9"], "--device tpu9")):
        assert cli.main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("moecl check: ") and msg in err[0]
    if not torch.cuda.is_available():
        assert cli.main(["check", "--device", "cuda"]) == 2
        assert "no CUDA device is available" in capsys.readouterr().err


@pytest.fixture
def peft_dir(tmp_path):
    from peft import LoraConfig, get_peft_model

    pm = get_peft_model(tiny_llama(dtype=torch.float32), LoraConfig(r=4, lora_alpha=8, target_modules=["up_proj"]))
    pm.save_pretrained(tmp_path / "ad")
    return tmp_path / "ad"


@pytest.mark.parametrize("damage, msg", [
    ("truncate", r"adapter_model\.safetensors could not be read"),
    ("json", r"adapter_config\.json is not valid JSON"),
    ("r", r"adapter_config\.json: r must be a positive integer, got 'eight'"),
    ("alpha", r"adapter_config\.json: lora_alpha must be a positive number, got -1"),
])
def test_import_peft_lora_names_the_broken_file(peft_dir, damage, msg):
    st, cfg_file = peft_dir / "adapter_model.safetensors", peft_dir / "adapter_config.json"
    if damage == "truncate":
        st.write_bytes(st.read_bytes()[:100])
    elif damage == "json":
        cfg_file.write_text(cfg_file.read_text()[:-20])
    else:
        cfg = json.loads(cfg_file.read_text())
        cfg.update({"r": "eight"} if damage == "r" else {"lora_alpha": -1})
        cfg_file.write_text(json.dumps(cfg))
    model = mk.inject(tiny_llama(dtype=torch.float32), target_modules=["up_proj"], num_tasks=2, gate=False)
    before = {n: p.clone() for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match=msg):
        mk.import_peft_lora(model, peft_dir, task=1)
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())


# --------------------------------------------------------------------------- GPT-2 Conv1D
def tiny_gpt2(seed=0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=64, n_positions=32,
                                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)).double().eval()


def test_conv1d_layer_equals_the_same_layer_on_the_transposed_linear():
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    conv = Conv1D(24, 16).double()
    lin = nn.Linear(16, 24).double()
    with torch.no_grad():
        lin.weight.copy_(conv.weight.t())
        lin.bias.copy_(conv.bias)
    a, b = mk.FusedMoELoRALinear(conv, 3, r=4, dropout=0.0), mk.FusedMoELoRALinear(lin, 3, r=4, dropout=0.0)
    assert (a.in_features, a.out_features) == (16, 24) and a.weight.shape == (16, 24)  # Conv1D's own layout kept
    with torch.no_grad():
        for (n, p), (_, q) in zip(a.adapter_parameters(), b.adapter_parameters()):
            p.copy_(torch.randn_like(p))
            q.copy_(p)
    x, t = torch.randn(2, 5, 16, dtype=torch.float64), torch.tensor([0, 2])
    assert torch.allclose(a(x, task_ids=t), b(x, task_ids=t), rtol=0, atol=1e-12)


def test_gpt2_conv1d_inject_save_load_merge_unload():
    model = tiny_gpt2()
    with torch.no_grad():
        base = model(IDS).logits
    mk.inject(model, target_modules="all-linear", num_tasks=2, gate=False, dropout=0.0)
    assert set(mk.moe_layers(model)) == {f"transformer.h.{i}.{n}" for i in (0, 1)
                                         for n in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")}
    randomize(model)
    with torch.no_grad():
        ref = model(IDS, task_ids=1).logits
        with mk.disable_adapters(model):
            assert torch.equal(model(IDS).logits, base)
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        mk.save(model, d)
        fresh = mk.load(tiny_gpt2(), d)
    with torch.no_grad():
        assert torch.equal(fresh(IDS, task_ids=1).logits, ref)
    mk.merge_and_unload(model, task=1)
    assert type(model.transformer.h[0].mlp.c_fc).__name__ == "Conv1D"
    with torch.no_grad():
        assert torch.allclose(model(IDS).logits, ref, rtol=0, atol=1e-10)

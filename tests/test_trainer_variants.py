"""The MoE-CL variants (per-task snapshots, discriminator memory, shared-path distillation,
shared learning rate), the linear-probe FWT, the transfer gain and the seed aggregation."""

import json

import pytest
import torch
import torch.nn.functional as F

import moecl_kernels as mk
from moecl_kernels.trainer import aggregate
from moecl_kernels.trainer.batching import collate
from moecl_kernels.trainer.config import load_config
from moecl_kernels.trainer.engine import MethodRun, build_model, prepare, run
from moecl_kernels.trainer.distributed import init_distributed
from moecl_kernels.trainer.methods import METHODS
from moecl_kernels.trainer.metrics import add_transfer_gain, cl_metrics, transfer_gain
from moecl_kernels.trainer.probe import fit_probe, probe_accuracy
from moecl_kernels.trainer.variants import (adapter_group, drift_loss, masked_mean, shared_path_of_pooled,
                                            warm_start_task_expert)


def _tiny(method, **over):
    args = ["data.synthetic.num_tasks=3", "data.synthetic.train_size=16", "data.synthetic.dev_size=4",
            "data.synthetic.test_size=4", "model.dropout=0.0", "model.level=linear"] + [f"{k}={v}" for k, v in over.items()]
    cfg = load_config(None, args)
    prep = prepare(cfg)
    torch.manual_seed(0)
    return build_model(cfg, METHODS[method], prep, torch.device("cpu")), prep


def _batch(prep, task=1, n=8):
    return collate(prep.train[task][:n], prep.encoder.pad_id, "classification")


def _randomise(params):
    with torch.no_grad():
        for p in params:
            p.normal_(0, 0.1)


# ------------------------------------------------------------------------------ metrics

def test_transfer_gain_la_and_probe_fwt_on_a_hand_made_matrix():
    R = [[0.9, 0.1, 0.2], [0.5, 0.8, 0.3], [0.6, 0.7, 0.95]]
    iso = [[0.85, 0.3, 0.3], [0.85, 0.9, 0.3], [0.85, 0.9, 0.8]]
    b = [0.5, 0.4, 0.1]
    probe, probe0 = [None, 0.7, 0.6], [0.55, 0.5, 0.65]
    m = cl_metrics(R, b, probe, probe0)
    assert m["LA"] == pytest.approx((0.9 + 0.8 + 0.95) / 3)
    assert m["FWT"] == pytest.approx(((0.7 - 0.5) + (0.6 - 0.65)) / 2)  # probes, not R's untrained heads
    assert cl_metrics(R, b)["FWT"] == pytest.approx(((0.1 - 0.4) + (0.3 - 0.1)) / 2)
    assert transfer_gain(R, iso) == pytest.approx(((0.9 - 0.85) + (0.8 - 0.9) + (0.95 - 0.8)) / 3)
    results = {"moecl": {"R": R, "metrics": dict(m)}, "isolated_lora": {"R": iso, "metrics": cl_metrics(iso, b)}}
    assert add_transfer_gain(results)
    assert results["isolated_lora"]["metrics"]["transfer_gain"] == 0.0
    assert results["moecl"]["metrics"]["transfer_gain"] == pytest.approx(transfer_gain(R, iso))
    assert not add_transfer_gain({"moecl": {"R": R, "metrics": dict(m)}})
    with pytest.raises(ValueError, match="probe"):
        cl_metrics(R, b, [None, None, 0.6], probe0)


def test_probe_fits_separable_features_and_is_deterministic():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(3, 16, generator=g) * 3
    y = torch.arange(90) % 3
    x = centres[y] + torch.randn(90, 16, generator=g)
    yt = torch.arange(30) % 3
    xt = centres[yt] + torch.randn(30, 16, generator=g)
    assert probe_accuracy(x, y, xt, yt, 3) == 1.0
    a, b = fit_probe(x, y, 3), fit_probe(x, y, 3)
    assert torch.equal(a[2], b[2])
    assert probe_accuracy(torch.randn(90, 16, generator=g), y, xt, yt, 3) < 0.7  # noise features: near chance


# ------------------------------------------------------------------------------ per-task snapshots

def test_gate_snapshot_restores_task_js_gate_at_evaluation():
    model, prep = _tiny("moecl_taskgate")
    state = {}
    model.bind(state)
    gates = adapter_group(model.backbone, "gate")
    assert gates and set(model.snapshot_params) == set(gates)
    _randomise([p for lay in mk.moe_layers(model.backbone).values() for p in [lay.lora_shared_B, *lay.lora_task_B]])
    _randomise(gates.values())
    model.end_task(0)
    gate0 = {n: p.detach().clone() for n, p in gates.items()}
    _randomise(gates.values())  # task 1 trains the gate on
    live = {n: p.detach().clone() for n, p in gates.items()}
    batch = _batch(prep, task=0)
    batch["task_ids"].zero_()
    model.eval()
    with model.task_view(0):
        assert all(torch.equal(p, gate0[n]) for n, p in gates.items())
        got = model.encode(batch, "test")
    assert all(torch.equal(p, live[n]) for n, p in gates.items())  # the live gate is back
    with torch.no_grad():  # the same features as running with task 0's gate in place
        for n, p in gates.items():
            p.copy_(gate0[n])
        want = model.encode(batch, "test")
        for n, p in gates.items():
            p.copy_(live[n])
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert not torch.equal(model.encode(batch, "test"), want)  # the gate matters
    with model.task_view(1):  # no snapshot yet (the task in training): the live gate
        assert all(torch.equal(p, live[n]) for n, p in gates.items())
    assert set(state["snapshots"]) == {0}
    shared = adapter_group(model.backbone, "shared")
    assert not set(shared) & set(model.snapshot_params)  # moecl_taskgate leaves the shared expert live


def test_shared_snapshot_holds_the_shared_expert_only():
    model, _ = _tiny("moecl_taskshared")
    names = set(model.snapshot_params)
    assert names == set(adapter_group(model.backbone, "shared")) and all("lora_shared_" in n for n in names)


# ------------------------------------------------------------------------------ discriminator memory

def test_memory_pooled_inputs_are_recomputed_under_the_current_shared_expert():
    model, prep = _tiny("moecl_dmem")
    model.bind({})
    layers = mk.moe_layers(model.backbone)
    _randomise([lay.lora_shared_B for lay in layers.values()])
    batch = _batch(prep, task=0)
    batch["task_ids"].zero_()
    model.eval()
    xbar = model.pooled_inputs(batch)
    names = model.discriminators.names
    assert set(xbar) == set(names) and xbar[names[0]].shape == (8, layers[names[0]].in_features)

    def pooled_now():
        mk.collect_pooled(model.backbone, True)
        with torch.no_grad():
            model.backbone(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], task_ids=batch["task_ids"])
        return mk.pooled_outputs(model.backbone)

    for n in names:  # docs/spec.md §1.2: p_n from the pooled input equals the layer's pooled shared path
        torch.testing.assert_close(shared_path_of_pooled(layers[n], xbar[n]), pooled_now()[n], rtol=1e-4, atol=1e-5)
    # the shared expert changes in the last module only (its input does not move): the memory's p_n follows it
    last = names[-1]
    _randomise([layers[last].lora_shared_A, layers[last].lora_shared_B])
    now = pooled_now()[last]
    torch.testing.assert_close(shared_path_of_pooled(layers[last], xbar[last]), now, rtol=1e-4, atol=1e-5)
    # masked mean: padding does not count
    x = torch.randn(2, 3, 4)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    torch.testing.assert_close(masked_mean(x, mask), torch.stack([x[0, :2].mean(0), x[1].mean(0)]))


def test_memory_gives_the_discriminator_every_finished_task():
    model, prep = _tiny("moecl_dmem")
    state = {}
    model.bind(state)
    model.set_task(1)
    batch = _batch(prep, task=1)
    lay = next(iter(mk.moe_layers(model.backbone).values()))
    _randomise([p for p in adapter_group(model.backbone, "shared").values()])
    # no memory yet (one task class): no adversarial objective, only the task loss
    out = model(**batch, scale=1.0 / 8)
    torch.testing.assert_close(out["loss"], out["task_loss"] / 8)
    mem_batch = _batch(prep, task=0)
    mem_batch["task_ids"].zero_()
    model.eval()
    model.memory[0] = model.pooled_inputs(mem_batch)
    assert state["memory"] is model.memory  # checkpointed with the engine's state
    model.train()
    model.zero_grad(set_to_none=True)
    out = model(**batch, scale=1.0 / 8)
    out["loss"].backward()
    W = model.discriminators.linears[0].weight
    assert W.grad is not None and W.grad[0].abs().sum() > 0  # class 0 (the memory's task) is trained
    assert lay.lora_shared_A.grad.abs().sum() > 0
    # L_D reported over batch and memory: the mean cross-entropy of all 16 rows
    layers = mk.moe_layers(model.backbone)
    with torch.no_grad():
        mk.collect_pooled(model.backbone, True, model.discriminators.names)
        model.backbone(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], task_ids=batch["task_ids"])
        pooled = mk.pooled_outputs(model.backbone)
        ld = []
        for n, lin in zip(model.discriminators.names, model.discriminators.linears):
            p = torch.cat([pooled[n], shared_path_of_pooled(layers[n], model.memory[0][n])])
            ids = torch.cat([batch["task_ids"], torch.zeros(8, dtype=torch.long)])
            ld.append(F.cross_entropy(F.linear(p.float(), lin.weight), ids))
    assert float(out["disc_loss"]) == pytest.approx(float(torch.stack(ld).mean()), rel=1e-4)


# ------------------------------------------------------------------------------ distillation, shared lr

def test_drift_loss_is_zero_at_the_snapshot_and_pulls_the_shared_expert_back():
    model, prep = _tiny("moecl_distill", **{"method.distill_lambda": 2.0})
    layers = mk.moe_layers(model.backbone)
    _randomise([lay.lora_shared_B for lay in layers.values()])
    model.drift_ref = model.shared_reference()
    model.set_task(1)
    batch = _batch(prep)
    with model.capture.capturing() as inputs:
        model.backbone(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], task_ids=batch["task_ids"])
    assert set(inputs) == set(layers)
    assert float(drift_loss(layers, inputs, batch["attention_mask"], model.drift_ref).detach()) == 0.0
    lay = next(iter(layers.values()))
    with torch.no_grad():
        lay.lora_shared_B.mul_(2.0)  # this module's shared path doubles: relative drift 1, averaged over modules
    d = drift_loss(layers, inputs, batch["attention_mask"], model.drift_ref)
    assert float(d) == pytest.approx(1.0 / len(layers), rel=1e-4)
    out = model(**batch, scale=1.0 / 8)
    assert float(out["drift"]) == pytest.approx(float(d), rel=1e-4)
    (g,) = torch.autograd.grad(out["loss"], [lay.lora_shared_B])
    model.distill_lambda = 0.0
    (g0,) = torch.autograd.grad(model(**batch, scale=1.0 / 8)["loss"], [lay.lora_shared_B])
    # the distillation gradient points back towards the snapshot (B = 2 B_0): positive along B
    assert float(((g - g0) * lay.lora_shared_B).sum()) > 0


def test_shared_lr_groups_from_the_second_task(tmp_path):
    cfg = load_config(None, [f"output_dir={tmp_path}", "methods=moecl_slr", "method.shared_lr_scale=0.25",
                             "data.synthetic.num_tasks=2", "data.synthetic.train_size=16"])
    mr = MethodRun(cfg, "moecl_slr", prepare(cfg), init_distributed())
    mr.model = build_model(cfg, mr.spec, mr.prep, torch.device("cpu"))
    mr.model.set_task(1)
    params = [p for p in mr.model.parameters() if p.requires_grad]
    assert len(mr._param_groups(params, 0)) == 1
    groups = mr._param_groups(params, 1)
    shared = {id(p) for p in adapter_group(mr.model.backbone, "shared").values()}
    assert {id(p) for p in groups[1]["params"]} == shared and groups[1]["lr"] == pytest.approx(0.25 * cfg.train.lr)
    assert not shared & {id(p) for p in groups[0]["params"]}


# ------------------------------------------------------------------------------ runs

SMALL = ["data.synthetic.num_tasks=2", "data.synthetic.train_size=48", "data.synthetic.dev_size=16",
         "data.synthetic.test_size=32", "train.batch_size=16", "train.epochs=2", "method.memory_per_task=8"]


@pytest.mark.parametrize("level,variants", [
    ("linear", ["moecl_snap_dmem"]),  # gate and shared snapshots, memory
    ("ffn", ["moecl_snap_warm"]),  # snapshots and warm start at the FFN level (the default)
    pytest.param("linear", ["moecl_distill", "moecl_slr", "moecl_warm"], marks=pytest.mark.slow),  # the other ideas
])
def test_variants_run_report_probes_and_the_transfer_gain(tmp_path, capsys, level, variants):
    cfg = load_config(None, [f"output_dir={tmp_path}", "name=v", f"methods=[isolated_lora,{','.join(variants)}]", *SMALL,
                             f"model.level={level}"])
    res = run(cfg)
    iso = res["isolated_lora"]
    assert iso["metrics"]["FWT"] == 0.0 and iso["metrics"]["transfer_gain"] == 0.0  # probes on the same backbone
    assert iso["probe_baseline"] == res[variants[0]]["probe_baseline"]  # the untrained backbone: all alike
    for name in variants:
        r = res[name]
        assert r["metrics"]["transfer_gain"] == pytest.approx(transfer_gain(r["R"], iso["R"]))
        rep = json.loads((tmp_path / "v" / name / "report.json").read_text())
        assert rep["metrics"]["transfer_gain"] == r["metrics"]["transfer_gain"]
        assert rep["probe"][0] is None and rep["probe"][1] is not None
    assert "transfer gain" in (tmp_path / "v" / "comparison.md").read_text()
    assert aggregate.main([str(tmp_path / "v"), "--out", str(tmp_path / "t.md")]) == 0
    table = (tmp_path / "t.md").read_text()
    assert "| isolated_lora | " in table and "+0.0 ± 0.0" in table and "| 0 |" in table
    capsys.readouterr()


def test_warm_start_copies_the_shared_expert_into_the_new_tasks_expert():
    model, _ = _tiny("moecl_warm")
    layers = mk.moe_layers(model.backbone)
    _randomise([p for lay in layers.values() for p in (lay.lora_shared_A, lay.lora_shared_B)])
    before = {n: (lay.lora_task_A[0].detach().clone(), lay.lora_task_B[0].detach().clone()) for n, lay in layers.items()}
    warm_start_task_expert(model.backbone, 2)
    for n, lay in layers.items():
        assert torch.equal(lay.lora_task_A[2], lay.lora_shared_A) and torch.equal(lay.lora_task_B[2], lay.lora_shared_B)
        assert torch.equal(lay.lora_task_A[0], before[n][0]) and torch.equal(lay.lora_task_B[0], before[n][1])


# ------------------------------------------------------------------------------ head_init=probe (LP-FT)

def test_probe_head_computes_the_probes_logits():
    from moecl_kernels.trainer.probe import probe_head

    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(60, 12, generator=g) * 3 + 1, torch.arange(60) % 4
    mean, std, W, b = probe = fit_probe(x, y, 4)
    weight, bias = probe_head(probe)
    xt = torch.randn(20, 12, generator=g, dtype=torch.float64)
    torch.testing.assert_close(F.linear(xt, weight, bias), ((xt - mean) / std) @ W + b)


def test_head_init_probe_starts_each_head_at_its_probe_without_touching_the_rng(tmp_path):
    """Before a task's first step its head predicts exactly as the probe fitted on the backbone as it
    stands; the training RNG is not drawn from (a random-init run and a probe-init run draw alike)."""
    args = [f"output_dir={tmp_path}", "data.synthetic.num_tasks=2", "data.synthetic.train_size=32",
            "data.synthetic.test_size=16", "train.head_init=probe"]
    cfg = load_config(None, args)
    mr = MethodRun(cfg, "moecl_snap", prepare(cfg), init_distributed())
    torch.manual_seed(0)
    mr.model = build_model(cfg, mr.spec, mr.prep, torch.device("cpu"))
    mr.state = {"task": 0, "R": [], "baseline": None, "probe": {}, "probe_base": None, "snapshots": {}}
    mr.model.bind(mr.state)
    _randomise(adapter_group(mr.model.backbone, "shared").values())  # a backbone that is not the pretrained one
    rng = torch.get_rng_state()
    mr.model.set_task(1)
    mr._init_head(1)
    assert torch.equal(torch.get_rng_state(), rng)
    with torch.no_grad():
        x, y = mr._features(1, mr.prep.test[1])
        logits = mr.model.heads[1](x.to(mr.model.heads[1].weight))
        mean, std, W, b = mr._fit(1)
    pred = (((x.double() - mean) / std) @ W + b).argmax(-1)
    assert torch.equal(logits.argmax(-1), pred)
    assert mr._evaluate(mr.prep.test[1], "test", 1) == pytest.approx(float((pred == y).double().mean()))
    with pytest.raises(Exception, match="train.head_init=probe needs train.mode=classification"):
        load_config(None, ["train.head_init=probe", "train.mode=generative"])


def test_snap_nogan_trains_as_nogan_and_evaluates_each_task_as_right_after_it(tmp_path):
    """moecl_snap_nogan = moecl_nogan's training (same R diagonal, bit for bit) with every task evaluated
    under the gate and shared expert it was trained with: no forgetting (R[i][j] = R[j][j])."""
    assert not METHODS["moecl_snap_nogan"].adversarial and METHODS["moecl_snap"].adversarial
    cfg = load_config(None, [f"output_dir={tmp_path}", "name=n", "methods=[moecl_nogan,moecl_snap_nogan]",
                             "data.synthetic.num_tasks=3", "train.lr=1e-2", *SMALL[1:]])
    res = run(cfg)
    plain, snap = res["moecl_nogan"]["R"], res["moecl_snap_nogan"]["R"]
    assert [plain[i][i] for i in range(3)] == [snap[i][i] for i in range(3)]
    assert all(snap[i][j] == snap[j][j] for i in range(3) for j in range(i))
    assert res["moecl_snap_nogan"]["metrics"]["BWT"] == 0.0
    assert any(plain[i][j] != plain[j][j] for i in range(3) for j in range(i))  # lr 1e-2: the plain run forgets

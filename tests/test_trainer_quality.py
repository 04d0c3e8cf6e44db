"""Honest continual-learning comparisons: the rank-matched isolated-LoRA baseline (its trainable
size per task equals MoE-CL's shared + task expert), the gain against it, the paired-seed
aggregation (synthetic report JSONs) and the transfer benchmark (``transfertext``)."""

import hashlib
import json

import pytest
import torch

import moecl_kernels as mk
from moecl_kernels.trainer import aggregate, realtext, transfertext
from moecl_kernels.trainer.config import load_config
from moecl_kernels.trainer.engine import build_model, prepare, run
from moecl_kernels.trainer.folder import load_folder
from moecl_kernels.trainer.methods import METHODS, trainable_adapter_count
from moecl_kernels.trainer.metrics import add_transfer_gain, transfer_gain


def _model(method, level, **over):
    cfg = load_config(None, ["data.synthetic.num_tasks=3", "data.synthetic.train_size=8", "data.synthetic.dev_size=4",
                             "data.synthetic.test_size=4", f"model.level={level}"] + [f"{k}={v}" for k, v in over.items()])
    torch.manual_seed(0)
    return build_model(cfg, METHODS[method], prepare(cfg), torch.device("cpu")), cfg


@pytest.mark.parametrize("level", ["linear", "ffn"])
def test_rank_matched_isolated_lora_trains_moecls_expert_size_per_task(level):
    """isolated_lora_rm's trainable adapters per task = MoE-CL's shared + task expert (rank 2r vs
    r + r, counted from the built models), MoE-CL's gates being the only difference."""
    moe, cfg = _model("moecl_snap_nogan", level)
    rm, _ = _model("isolated_lora_rm", level)
    iso, _ = _model("isolated_lora", level)
    r = cfg.model.r
    gates = sum(layer.moe_gate.numel() for layer in mk.moe_layers(moe.backbone).values())
    assert gates > 0
    # the LoRA parameters of one rank-r expert, from the module shapes: r (d_in + d_out) per projection
    one_expert = sum(r * (p.in_features + p.out_features) for layer in mk.moe_layers(moe.backbone).values()
                     for p in layer.lora_projections())
    for task in (0, 2):
        assert trainable_adapter_count(moe.backbone, METHODS["moecl_snap_nogan"], task) == 2 * one_expert + gates
        assert trainable_adapter_count(rm.backbone, METHODS["isolated_lora_rm"], task) == 2 * one_expert
        assert trainable_adapter_count(iso.backbone, METHODS["isolated_lora"], task) == one_expert
    layer = next(iter(mk.moe_layers(rm.backbone).values()))
    proj = next(iter(layer.lora_projections()))
    assert proj.lora_task_A[0].shape[0] == 2 * r
    assert layer.r == 2 * r and layer.lora_alpha / layer.r == pytest.approx(cfg.model.alpha / r)  # MoE-CL's scale
    assert layer.moe_gate is None


@pytest.mark.parametrize("level", ["linear", "ffn"])
def test_rank_matched_baseline_is_in_methods_all(level):
    cfg = load_config(None, ["methods=all", f"model.level={level}"])
    assert "isolated_lora_rm" in cfg.methods and "isolated_lora" in cfg.methods


def test_gain_against_the_rank_matched_baseline():
    R = [[0.9, 0.1], [0.5, 0.8]]
    iso = [[0.85, 0.3], [0.85, 0.9]]
    rm = [[0.95, 0.3], [0.95, 0.7]]
    results = {n: {"R": m, "metrics": {}} for n, m in (("moecl", R), ("isolated_lora", iso), ("isolated_lora_rm", rm))}
    assert add_transfer_gain(results)
    assert results["moecl"]["metrics"]["transfer_gain_rm"] == pytest.approx(((0.9 - 0.95) + (0.8 - 0.7)) / 2)
    assert results["moecl"]["metrics"]["transfer_gain"] == pytest.approx(transfer_gain(R, iso))
    assert results["isolated_lora_rm"]["metrics"]["transfer_gain_rm"] == 0.0
    only_rm = {n: {"R": m, "metrics": {}} for n, m in (("moecl", R), ("isolated_lora_rm", rm))}
    assert add_transfer_gain(only_rm) and "transfer_gain" not in only_rm["moecl"]["metrics"]


def test_a_run_with_the_rank_matched_baseline_reports_the_gain_against_it(tmp_path, capsys):
    cfg = load_config(None, [f"output_dir={tmp_path}", "name=q", "methods=[isolated_lora_rm,moecl_snap_nogan]",
                             "data.synthetic.num_tasks=2", "data.synthetic.train_size=16", "data.synthetic.dev_size=4",
                             "data.synthetic.test_size=8", "train.batch_size=8", "train.epochs=1",
                             "train.fwt_probe=false"])
    res = run(cfg)
    rm, moe = res["isolated_lora_rm"], res["moecl_snap_nogan"]
    assert rm["metrics"]["transfer_gain_rm"] == 0.0 and rm["metrics"]["BWT"] == 0.0
    assert moe["metrics"]["transfer_gain_rm"] == pytest.approx(transfer_gain(moe["R"], rm["R"]))
    assert moe["metrics"]["transfer_gain"] is None  # no isolated_lora in this run
    rep = json.loads((tmp_path / "q" / "moecl_snap_nogan" / "report.json").read_text())
    assert rep["metrics"]["transfer_gain_rm"] == moe["metrics"]["transfer_gain_rm"]
    assert "gain vs rank-matched" in (tmp_path / "q" / "comparison.md").read_text()
    capsys.readouterr()


# ------------------------------------------------------------------------------ paired aggregation

def _write_run(root, name, seed, metrics):
    """A finished run directory as the engine writes it (comparison.json + report.json per method)."""
    d = root / name
    comp = {}
    for method, (acc, bwt, la) in metrics.items():
        m = {"ACC": acc, "BWT": bwt, "FWT": 0.0, "LA": la, "transfer_gain": None}
        comp[method] = {"metrics": m, "wall_time_s": 10.0}
        (d / method).mkdir(parents=True)
        (d / method / "report.json").write_text(json.dumps({"seed": seed, "metrics": m}))
    (d / "comparison.json").write_text(json.dumps(comp))
    return d


def _runs(tmp_path):
    """moecl_snap_nogan ran seeds 0-3, isolated_lora_rm seeds 1-4: paired on 1, 2, 3. On its
    own seeds moecl's mean ACC (0.80) beats the reference's (0.775), on the paired seeds it does not."""
    moe = {0: (0.95, 0.0, 0.95), 1: (0.70, 0.0, 0.70), 2: (0.80, 0.0, 0.80), 3: (0.75, 0.0, 0.75)}
    rm = {1: (0.72, 0.0, 0.72), 2: (0.79, 0.0, 0.79), 3: (0.78, 0.0, 0.78), 4: (0.81, 0.0, 0.81)}
    dirs = []
    for s in range(5):
        m = {}
        if s in rm:
            m["isolated_lora_rm"] = rm[s]
        if s in moe:
            m["moecl_snap_nogan"] = moe[s]
        m["isolated_lora"] = (0.5, 0.0, 0.5)
        dirs.append(_write_run(tmp_path, f"s{s}", s, m))
    return dirs


def test_aggregate_compares_on_the_paired_seeds_only(tmp_path):
    result = aggregate.aggregate(aggregate.collect(_runs(tmp_path)))
    assert result["reference"] == "isolated_lora_rm"  # rank-matched by default
    e = result["methods"]["moecl_snap_nogan"]
    assert e["ACC"][0] == pytest.approx(0.80) and result["methods"]["isolated_lora_rm"]["ACC"][0] == pytest.approx(0.775)
    p = e["paired"]
    assert p["seeds"] == [1, 2, 3] and p["n"] == 3 and p["wins"] == 1
    diffs = [0.70 - 0.72, 0.80 - 0.79, 0.75 - 0.78]
    mean = sum(diffs) / 3
    assert p["dACC"][0] == pytest.approx(mean)
    assert p["dACC"][1] == pytest.approx((sum((d - mean) ** 2 for d in diffs) / 2) ** 0.5)
    assert p["dLA"][0] == pytest.approx(mean)
    assert e["bar"] is False  # the unpaired means would say yes
    assert result["methods"]["isolated_lora_rm"]["paired"] is None and result["methods"]["isolated_lora_rm"]["bar"] is None
    iso = aggregate.aggregate(aggregate.collect(_runs(tmp_path / "b")), ref="isolated_lora")
    assert iso["methods"]["moecl_snap_nogan"]["paired"]["n"] == 4 and iso["methods"]["moecl_snap_nogan"]["bar"] is True


def test_aggregate_table_and_errors(tmp_path, capsys):
    dirs = [str(d) for d in _runs(tmp_path)]
    assert aggregate.main(dirs + ["--out", str(tmp_path / "t.md"), "--json", str(tmp_path / "t.json")]) == 0
    table = (tmp_path / "t.md").read_text()
    assert "ΔACC vs isolated_lora_rm, paired (pp)" in table
    row = next(line for line in table.splitlines() if line.startswith("| moecl_snap_nogan |"))
    assert "| -1.3 ± 2.1 |" in row and "| 1/3 (1,2,3) | no | 0,1,2,3 |" in row
    assert "| isolated_lora_rm |" in table and "| ref |" in table
    assert json.loads((tmp_path / "t.json").read_text())["reference"] == "isolated_lora_rm"
    assert aggregate.main(dirs + ["--ref", "olora"]) == 2
    assert "--ref olora is not among" in capsys.readouterr().err
    assert aggregate.main([dirs[0], dirs[0]]) == 2  # the same seed twice
    assert "seed 0 in two runs" in capsys.readouterr().err


# ------------------------------------------------------------------------------ the transfer benchmark

def _raw_sources():
    """task -> area -> sentences, as ``transfertext.raw_sources`` returns them (made up here)."""
    raw = {t: {} for t in transfertext.TASK_ORDER}
    words = "apple river stone cloud maple tiger violin garden lantern harbor meadow copper".split()
    for task, nth in zip(transfertext.TASK_ORDER, ("first", "second", "third")):
        for area in ("alpha", "beta"):
            raw[task][area] = [f"The {area} text of the {nth} source explains the {w} plainly." for w in words]
    raw["area_b"]["alpha"].append(raw["area_a"]["alpha"][0])  # found in two tasks' sources: dropped from both
    raw["area_c"]["beta"].append(raw["area_c"]["alpha"][1])  # found under two areas: dropped from both
    return raw


def test_transfer_benchmark_is_deterministic_same_labels_and_leak_free():
    sizes = {"area_a": (4, 2, 3), "area_b": (2, 2, 3), "area_c": (2, 2, 3)}
    a = transfertext.build(seed=0, sizes=sizes, raw=_raw_sources())
    assert a == transfertext.build(seed=0, sizes=sizes, raw=_raw_sources())
    assert a["manifest"]["sha256"] != transfertext.build(seed=1, sizes=sizes, raw=_raw_sources())["manifest"]["sha256"]
    tasks = a["tasks"]
    assert list(tasks) == list(transfertext.TASK_ORDER)
    assert all(t["labels"] == ["alpha", "beta"] for t in tasks.values())  # the same label kind in every task
    for name, (n_train, n_dev, n_test) in sizes.items():
        assert [len(tasks[name][s]) for s in ("train", "dev", "test")] == [2 * n_train, 2 * n_dev, 2 * n_test]
    texts = [{e["text"] for s in ("train", "dev", "test") for e in t[s]} for t in tasks.values()]
    assert not (texts[0] & texts[1] or texts[0] & texts[2] or texts[1] & texts[2])
    leaked = _raw_sources()["area_a"]["alpha"][0]
    assert all(leaked not in t for t in texts)
    assert all(_raw_sources()["area_c"]["alpha"][1] not in t for t in texts)
    with pytest.raises(RuntimeError, match="area_a.*'alpha' has 11 sentences, needs 12"):
        transfertext.build(sizes={"area_a": (8, 2, 2)}, raw=_raw_sources())


def test_transfer_sources_are_split_disjoint_and_balanced():
    units = {"big.py": ["s"] * 10, "a.py": ["a"] * 4, "b.py": ["b"] * 4, "c.py": ["c"] * 3, "d.py": ["d"] * 3}
    groups = transfertext.split_sources(units, 3)
    assert groups == [["s"] * 10, ["a"] * 4 + ["c"] * 3, ["b"] * 4 + ["d"] * 3]


@pytest.mark.slow
def test_transfer_benchmark_from_the_installed_stdlib_generates_deterministically(tmp_path):
    raw = transfertext.raw_sources()
    a = transfertext.build(seed=0, raw=raw)
    assert a == transfertext.build(seed=0)  # read again from the files
    assert a["manifest"]["sha256"] == realtext.content_hash(a["tasks"])
    realtext.write(a, tmp_path)
    loaded = load_folder(tmp_path)
    assert [t.name for t in loaded] == list(transfertext.TASK_ORDER)
    assert [len(t.train) for t in loaded] == [8 * 40, 8 * 20, 8 * 20] and all(t.num_classes == 8 for t in loaded)


# ------------------------------------------------------------------------------ the adversarial loss

@pytest.mark.parametrize("probs", [False, True])
def test_discriminator_loss_over_logits_or_the_official_codes_probabilities(probs):
    from moecl_kernels.trainer.model import Discriminators
    torch.manual_seed(0)
    d = Discriminators({"m": 6}, num_tasks=3, probs=probs)  # fp32, as the trainer runs it
    with torch.no_grad():
        d.linears[0].weight.mul_(200.0)  # a confident discriminator
    pooled = {"m": torch.randn(4, 6, requires_grad=True)}
    tasks = torch.tensor([0, 1, 2, 1])
    disc, shared = d.losses(pooled, tasks)
    logits = pooled["m"].detach().double() @ d.linears[0].weight.detach().double().T  # the float64 reference
    scores = logits.softmax(-1) if probs else logits
    ref = -(scores.log_softmax(-1)[torch.arange(4), tasks]).sum()
    assert disc.item() == pytest.approx(ref.item(), rel=1e-5) and shared.item() == pytest.approx(ref.item(), rel=1e-5)
    e = torch.e
    if probs:  # bounded: each row in [log(T - 1 + e) - 1, log(1 + (T - 1) e)]
        assert 4 * (torch.log(torch.tensor(2 + e)) - 1) <= ref <= 4 * torch.log(torch.tensor(1 + 2 * e))
    else:
        assert ref > 4 * torch.log(torch.tensor(1 + 2 * e))  # the logits' loss is not
    shared.backward()
    assert pooled["m"].grad is not None and d.linears[0].weight.grad is None  # the shared side: p_n only


def test_adv_loss_is_checked():
    from moecl_kernels.trainer.config import ConfigError
    with pytest.raises(ConfigError, match="method.adv_loss"):
        load_config(None, ["method.adv_loss=softmax"])
    assert load_config(None, ["method.adv_loss=probs"]).method.adv_loss == "probs"
    # the default leaves the fingerprint of checkpoints written before the key existed unchanged; probs changes it
    default = load_config(None, [])
    assert default.fingerprint() != load_config(None, ["method.adv_loss=probs"]).fingerprint()
    d = {k: v for k, v in default.to_dict().items() if k not in ("methods", "output_dir", "name")}
    d["train"] = {k: v for k, v in d["train"].items() if k != "parallel"}
    d["method"] = {k: v for k, v in d["method"].items() if k != "adv_loss"}  # the config as it was before the key
    assert default.fingerprint() == hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]

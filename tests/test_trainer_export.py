"""A trained run is usable on its own: each method's export (trainer/export.py) is loaded in a fresh
process by ``python -m moecl_kernels evaluate`` (the report's final row, as JSON on the last line)
and ``predict`` (labels of a JSONL file), with the training checkpoint deleted; in Python, one
mixed-task batch serves every task (frozen ones through their snapshots)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import moecl_kernels as mk
from moecl_kernels.trainer.batching import collate
from moecl_kernels.trainer.config import load_config
from moecl_kernels.trainer.engine import prepare, run
from moecl_kernels.trainer.export import ExportError, evaluate_export, load_export, predict
from moecl_kernels.trainer.export import main as export_main

ROOT = Path(__file__).resolve().parents[1]
TINY = ["data.synthetic.num_tasks=3", "data.synthetic.train_size=32", "data.synthetic.dev_size=8",
        "data.synthetic.test_size=24", "train.batch_size=16", "train.epochs=1"]


def _cli(*args) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "moecl_kernels", *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=300)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    cfg = load_config(None, [f"output_dir={out}", "name=r", "methods=[moecl_snap_nogan,moecl_taskgate]", *TINY])
    res = run(cfg)
    for ckpt in cfg.run_dir.glob("*/checkpoint*"):  # the export alone must do
        ckpt.unlink()
    return cfg, res


def test_evaluate_in_a_fresh_process_prints_the_reports_final_row(trained):
    cfg, res = trained
    p = _cli("evaluate", cfg.run_dir / "moecl_snap_nogan")
    assert p.returncode == 0, p.stderr
    got = json.loads(p.stdout.strip().splitlines()[-1])
    r = res["moecl_snap_nogan"]
    assert got == dict(zip(r["tasks"], r["R"][-1]))
    assert mk.frozen_tasks(load_export(cfg.run_dir / "moecl_snap_nogan").model.backbone) == [0, 1, 2]


def test_evaluate_swapped_snapshots_method_in_process(trained):
    cfg, res = trained
    r = res["moecl_taskgate"]
    assert evaluate_export(cfg.run_dir / "moecl_taskgate") == dict(zip(r["tasks"], r["R"][-1]))


def test_predict_writes_labels(trained, tmp_path, capsys):
    cfg, res = trained
    prep = prepare(cfg)
    task = prep.tasks[1]
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"text": e.text}) + "\n" for e in task.test))
    p = _cli("predict", cfg.run_dir / "moecl_snap_nogan", "--task", task.name, "--input", src, "--output",
             tmp_path / "out.jsonl")
    assert p.returncode == 0, p.stderr
    labels = [json.loads(line)["label"] for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert len(labels) == len(task.test) and set(labels) <= set(task.label_names)
    acc = sum(task.label_names[e.label] == lab for e, lab in zip(task.test, labels)) / len(labels)
    assert acc == pytest.approx(res["moecl_snap_nogan"]["R"][-1][1])
    assert export_main(["predict", str(cfg.run_dir / "moecl_snap_nogan"), "--task", "nope", "--input", str(src)]) == 2
    assert "not in this export" in capsys.readouterr().err
    with pytest.raises(ExportError, match="holds no export.json"):
        predict(tmp_path, task.name, ["x"])


def test_mixed_task_batch_serves_every_task_in_one_forward(trained):
    """Python serving: one batch holding every task's test examples (frozen tasks included) gives
    each task the accuracy of the report."""
    cfg, res = trained
    ld = load_export(cfg.run_dir / "moecl_snap_nogan")
    prep = prepare(cfg)
    items = [e for j in range(len(prep.tasks)) for e in prep.test[j]]
    batch = collate(items, prep.encoder.pad_id, "classification")
    feats = ld.model.encode(batch, "test")
    tasks = batch["task_ids"]
    for j, acc in enumerate(res["moecl_snap_nogan"]["R"][-1]):
        idx = (tasks == j).nonzero().squeeze(1)
        got = (ld.model.heads[j](feats[idx]).argmax(-1) == batch["labels"][idx]).float().mean()
        assert float(got) == pytest.approx(acc, abs=1.5 / len(idx))  # padding to the batch's longest: float noise
    assert torch.is_tensor(feats)

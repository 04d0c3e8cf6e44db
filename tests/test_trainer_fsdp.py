"""FSDP2 (``train.parallel=fsdp``): the frozen backbone sharded over the processes, the
adapters whole on each. In-process on a 1-process gloo group (fast): sharding, outputs and
the O-LoRA merge into sharded weights. Under torchrun / ``accelerate launch`` with 2 CPU
processes (slow): the same metrics as 1 process (within one test example per accuracy,
LoRA dropout off, as for DDP), a killed run resumes to them, and its checkpoint resumes
in a 1-process run."""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import moecl_kernels as mk
from moecl_kernels.trainer.batching import collate
from moecl_kernels.trainer.config import load_config
from moecl_kernels.trainer.distributed import DistInfo
from moecl_kernels.trainer.engine import build_model, prepare, run
from moecl_kernels.trainer.methods import METHODS, merge_expert
from moecl_kernels.trainer.model import adapter_parameters
from moecl_kernels.trainer.parallel import average_gradients, is_sharded, parallel_kind, shard_backbone

ROOT = Path(__file__).resolve().parents[1]
ARGS = ["methods=[moecl,olora]", "data.synthetic.num_tasks=2", "data.synthetic.train_size=64",
        "data.synthetic.dev_size=16", "data.synthetic.test_size=40", "train.batch_size=16", "train.epochs=2",
        "model.dropout=0.0", "train.checkpoint_every=3"]
TEST_SIZE = 40


@pytest.fixture
def one_process_group():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        yield DistInfo(0, 1, 0, torch.device("cpu"))
    finally:
        dist.destroy_process_group()


def test_parallel_kind(monkeypatch):
    two = DistInfo(0, 2, 0, torch.device("cpu"))
    assert parallel_kind("fsdp", DistInfo()) == "single"
    assert parallel_kind("fsdp", two) == "fsdp" and parallel_kind("ddp", two) == "ddp"
    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    assert parallel_kind("auto", two) == "ddp"
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    assert parallel_kind("auto", two) == "fsdp"


def test_sharded_backbone_keeps_adapters_whole_and_outputs(one_process_group):
    cfg = load_config(None, ["data.synthetic.num_tasks=2", "data.synthetic.train_size=16", "data.synthetic.dev_size=4",
                             "data.synthetic.test_size=4", "model.dropout=0.0"])
    prep = prepare(cfg)
    torch.manual_seed(0)
    plain = build_model(cfg, METHODS["olora"], prep, torch.device("cpu"))
    torch.manual_seed(0)
    model = build_model(cfg, METHODS["olora"], prep, torch.device("cpu"))
    with torch.no_grad():
        for p in adapter_parameters(plain.backbone) + adapter_parameters(model.backbone):
            p.normal_(0, 0.05, generator=torch.Generator().manual_seed(p.numel()))
    assert shard_backbone(model.backbone, adapter_parameters(model.backbone), one_process_group) == 2
    layer = next(iter(mk.moe_layers(model.backbone).values())).lora_projections()[0]
    assert is_sharded(layer.weight) and not any(is_sharded(p) for p in adapter_parameters(model.backbone))
    batch = collate(prep.train[1][:4], prep.encoder.pad_id, "classification")
    model.set_task(1)
    plain.set_task(1)
    for m in (plain, model):
        merge_expert(m.backbone, 0)  # O-LoRA: the delta goes into the (sharded) base weights
    out, ref = model(**batch, scale=0.25), plain(**batch, scale=0.25)
    torch.testing.assert_close(out["loss"], ref["loss"])
    out["loss"].backward()
    ref["loss"].backward()
    params = [p for p in model.parameters() if p.requires_grad]
    assert params and not any(is_sharded(p) for p in params)
    average_gradients(params, one_process_group)  # a world of one: the mean is the gradient itself
    ref_params = [p for p in plain.parameters() if p.requires_grad]
    for p, q in zip(params, ref_params):
        torch.testing.assert_close(p.grad, q.grad)


def _launch(cmd, tmp_path, name, *extra, env=None):
    e = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=f"{ROOT}{os.pathsep}{ROOT / 'tests'}", **(env or {}))
    return subprocess.run([*cmd, f"output_dir={tmp_path}", f"name={name}", *ARGS, *extra, "-q"], env=e,
                          capture_output=True, text=True, timeout=900)


def _torchrun(*entry):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *entry]


def _assert_close(one, report_dir):
    for method, a in one.items():
        b = json.loads((report_dir / method / "report.json").read_text())
        assert b["machine"]["world_size"] == 2 and b["parallel"] == "fsdp"
        for r1, r2 in zip(a["R"] + [a["baseline"]], b["R"] + [b["baseline"]]):
            for x, y in zip(r1, r2):
                assert abs(x - y) <= 1 / TEST_SIZE + 1e-9, (method, a["R"], b["R"])


@pytest.mark.slow
def test_fsdp_two_processes_match_one_resume_and_load_in_one(tmp_path):
    single = run(load_config(None, [f"output_dir={tmp_path}", "name=one", *ARGS]))
    # a 2-process FSDP run killed at step 11 (task 2 of moecl; last checkpoint at step 9)
    crashed = _launch(_torchrun(str(ROOT / "tests" / "trainer_crash_entry.py")), tmp_path, "two",
                      "train.parallel=fsdp", env={"MOECL_TEST_CRASH_AT_STEP": "11"})
    assert crashed.returncode != 0 and not (tmp_path / "two" / "moecl" / "report.json").exists()
    ckpt = torch.load(tmp_path / "two" / "moecl" / "checkpoint.pt", weights_only=False)
    assert ckpt["global_step"] == 9 and ckpt["state"]["task"] == 1
    shutil.copytree(tmp_path / "two", tmp_path / "one_from_two")
    resumed = _launch(_torchrun("-m", "moecl_kernels.trainer.cli"), tmp_path, "two", "train.parallel=fsdp", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    _assert_close(single, tmp_path / "two")
    # the 2-process checkpoint resumes in 1 process (whole adapter tensors, same format)
    again = run(load_config(None, [f"output_dir={tmp_path}", "name=one_from_two", *ARGS]), resume=True)
    for method, a in single.items():
        for r1, r2 in zip(a["R"], again[method]["R"]):
            assert all(abs(x - y) <= 1 / TEST_SIZE + 1e-9 for x, y in zip(r1, r2)), (method, a["R"], again[method]["R"])


@pytest.mark.slow
def test_accelerate_launch_use_fsdp_matches_one_process(tmp_path):
    pytest.importorskip("accelerate")
    single = run(load_config(None, [f"output_dir={tmp_path}", "name=one", *ARGS]))
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--use_fsdp", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "moecl_kernels.trainer.cli"]
    proc = _launch(cmd, tmp_path, "acc")
    assert proc.returncode == 0, proc.stderr[-3000:]
    _assert_close(single, tmp_path / "acc")

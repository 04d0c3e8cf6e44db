"""Data-parallel runs: torchrun with 2 CPU processes (gloo) gives the same metrics as one
process with the same global batch. Tolerance: every accuracy within one test example
(float reduction order differs between the runs); LoRA dropout is off (its masks depend
on each process's token layout)."""

import json
import os
import subprocess
import sys
from pathlib import Path

from moecl_kernels.trainer.config import load_config
from moecl_kernels.trainer.engine import run

ARGS = ["methods=[moecl,seq_lora]", "data.synthetic.num_tasks=2", "data.synthetic.train_size=64",
        "data.synthetic.dev_size=16", "data.synthetic.test_size=40", "train.batch_size=16", "train.epochs=2",
        "model.dropout=0.0", "train.checkpoint_every=0"]


def test_two_process_torchrun_matches_one_process(tmp_path):
    single = run(load_config(None, [f"output_dir={tmp_path}", "name=one", *ARGS]))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "moecl_kernels.trainer.cli", f"output_dir={tmp_path}", "name=two", *ARGS, "-q"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for method, one in single.items():
        two = json.loads((tmp_path / "two" / method / "report.json").read_text())
        assert two["machine"]["world_size"] == 2
        for r1, r2 in zip(one["R"] + [one["baseline"]], two["R"] + [two["baseline"]]):
            for a, b in zip(r1, r2):
                assert abs(a - b) <= 1 / 40 + 1e-9, (method, one["R"], two["R"])

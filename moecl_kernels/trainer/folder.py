"""Your own task sequence: ``data.benchmark: folder``.

``data.root`` holds one sub-folder per task (task name = folder name) with ``train.jsonl``,
``test.jsonl`` and optionally ``dev.jsonl`` (otherwise a seeded per-class split of train) and
``task.json``. One JSON object a line, either

* classification: ``{"text": ..., "label": ...}`` (keys set by ``data.text_key`` /
  ``data.label_key``; ``sentence`` is accepted for ``text``). String labels: the classes are
  the sorted distinct labels of train, unless ``task.json`` gives ``{"labels": [...]}``.
  Int labels are 0-based class indices. A dev/test label that train does not have is an
  error naming the file and line.
* instruction data (generative mode): ``{"input": ..., "output": ...}`` with an optional
  per-line ``"instruction"`` put before the input. Per-class sampling treats a task's
  examples as one class (``train_per_class`` caps the count).

``task.json`` (optional): ``{"labels": [...], "instruction": "..."}``; the instruction is the
prompt prefix for decoders (default: ``task : <name>``). ``data.order``: a list or a comma
string of task names; default: the ``order`` of ``<root>/benchmark.json`` if there is one
(the real-text benchmark writes it), else the sorted folder names.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any, Optional, Sequence, Union

from .data import (DataFormatError, Example, TaskData, _split_train_dev, field_text, jsonl_objects, label_index,
                   sample_per_class)

SPLITS = ("train", "dev", "test")


def task_folders(root: Path) -> list[str]:
    """The task folders of ``root``: every sub-folder (hidden ones, ``.name``, aside). A sub-folder
    without ``train.jsonl`` and ``test.jsonl`` is an error naming it and what it holds (a misnamed
    file would otherwise drop the task silently)."""
    names = []
    for p in sorted(root.iterdir()):
        if not p.is_dir() or p.name.startswith("."):
            continue
        absent = [f"{s}.jsonl" for s in ("train", "test") if not (p / f"{s}.jsonl").is_file()]
        if absent:
            held = sorted(f.name for f in p.iterdir())[:8]
            raise DataFormatError(f"data.root {str(root)!r}: sub-folder {p.name!r} is not a task folder: it has no "
                                  f"{' and no '.join(absent)} (it holds {held}); every sub-folder of data.root is a "
                                  "task (train.jsonl, test.jsonl, optional dev.jsonl and task.json): rename the files "
                                  "or move the folder out")
        names.append(p.name)
    return names


def resolve_folder_order(root: Union[str, Path], order: Any = None) -> list[str]:
    """The task names of ``order`` (None: the manifest's order, else sorted), checked against ``root``."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"data.root: directory {str(root)!r} does not exist")
    available = task_folders(root)
    if order is None:
        manifest = root / "benchmark.json"
        order = json.loads(manifest.read_text()).get("order") if manifest.is_file() else None
        names = list(order) if order else available
    elif isinstance(order, str):
        names = [s.strip() for s in order.split(",") if s.strip()]
    else:
        names = [str(s) for s in order]
    if not names:
        raise ValueError(f"data.root {str(root)!r} holds no task folder (a sub-folder with train.jsonl)")
    for n in names:
        if n not in available:
            raise ValueError(f"data.order names task {n!r}, but {root} has no folder {n}/ with train.jsonl; "
                             f"task folders: {available}")
    if len(set(names)) != len(names):
        raise ValueError(f"data.order lists a task twice: {names}")
    return names


def read_task_meta(d: Path) -> dict[str, Any]:
    path = d / "task.json"
    if not path.is_file():
        return {}
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise DataFormatError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(meta, dict) or set(meta) - {"labels", "instruction"}:
        raise DataFormatError(f"{path}: expected an object with optional 'labels' and 'instruction'")
    labels = meta.get("labels")
    if labels is not None and (not isinstance(labels, list) or not labels or len(set(map(str, labels))) != len(labels)
                               or not all(isinstance(x, str) and x.strip() for x in labels)):
        raise DataFormatError(f"{path}: 'labels' must be a non-empty list of distinct class names")
    if "instruction" in meta and not isinstance(meta["instruction"], str):
        raise DataFormatError(f"{path}: 'instruction' must be a string")
    return meta


class _Rows:
    """The parsed lines of one file: ``(where, text, raw label | None, output | None)``."""

    def __init__(self, path: Path, text_key: str, label_key: str) -> None:
        self.path, self.rows, self.kind = path, [], None
        for line_no, obj in jsonl_objects(path):
            where = f"{path}:{line_no}"
            if label_key in obj:
                kind = "classification"
                key = text_key if text_key in obj or text_key != "text" else "sentence"
                if key not in obj:
                    raise DataFormatError(f"{where}: no text: expected the key {text_key!r}"
                                          + (" (or 'sentence')" if text_key == "text" else ""))
                row = (where, field_text(obj, key, where), obj[label_key], None)
            elif "input" in obj and "output" in obj:
                kind = "instruction"
                text = field_text(obj, "input", where)
                if "instruction" in obj:
                    text = field_text(obj, "instruction", where) + "\n" + text
                row = (where, text, None, field_text(obj, "output", where))
            else:
                raise DataFormatError(f"{where}: expected {{{text_key!r}: ..., {label_key!r}: ...}} or "
                                      f"{{'input': ..., 'output': ...}}; got keys {sorted(obj)}")
            if self.kind is not None and kind != self.kind:
                raise DataFormatError(f"{where}: a {kind} line in a file of {self.kind} lines")
            self.kind = kind
            self.rows.append(row)


def _class_names(train: _Rows, meta: dict) -> list[str]:
    if "labels" in meta:
        return list(meta["labels"])
    kinds = {isinstance(r[2], str) for r in train.rows}
    if len(kinds) > 1:
        where = next(r[0] for r in train.rows if isinstance(r[2], str) != isinstance(train.rows[0][2], str))
        raise DataFormatError(f"{where}: mixes class-name and integer labels (use one kind per task)")
    if kinds == {True}:
        return sorted({r[2] for r in train.rows})
    bad = next((r for r in train.rows if isinstance(r[2], bool) or not isinstance(r[2], int) or r[2] < 0), None)
    if bad is not None:
        raise DataFormatError(f"{bad[0]}: the label must be a 0-based int or a class name, got {bad[2]!r}")
    return [str(i) for i in range(max(r[2] for r in train.rows) + 1)]


def _check_classes(path: Path, names: list[str], seen: set[int], from_meta: bool) -> None:
    """A classification task has two classes or more, and int labels leave no class index unused
    (1..K labels would make a phantom class 0 that no example has)."""
    if len(seen) < 2:
        raise DataFormatError(f"{path}: every example has the label {names[next(iter(seen))]!r}: a classification "
                              "task needs at least two classes (accuracy on one class is always 100 %)")
    unused = sorted(set(range(len(names))) - seen)
    if unused and not from_meta:
        if unused == [0]:
            raise DataFormatError(f"{path}: the int labels run 1..{len(names) - 1} but labels are 0-based class "
                                  "indices (0..K-1): subtract 1 from every label, or use class names")
        raise DataFormatError(f"{path}: int labels are 0-based class indices, but classes {unused[:8]} of 0.."
                              f"{len(names) - 1} have no example; renumber the labels 0..K-1, or use class names")


def _examples(rows: _Rows, names: list[str], seen: Optional[set[int]]) -> list[Example]:
    if rows.kind == "instruction":
        return [Example(text, -1, output) for _, text, _, output in rows.rows]
    out = []
    for where, text, raw, _ in rows.rows:
        known = not isinstance(raw, str) or raw in names
        label = label_index(raw, names, where) if known or seen is None else -1
        if seen is not None and label not in seen:
            raise DataFormatError(f"{where}: label {raw!r} does not occur in {rows.path.parent / 'train.jsonl'}; "
                                  f"train's classes: {[names[i] for i in sorted(seen)]}")
        out.append(Example(text, label))
    return out


def load_task(d: Path, text_key: str = "text", label_key: str = "label") -> TaskData:
    """All examples of one task folder (no sampling; ``dev`` empty when there is no dev.jsonl)."""
    for split in ("train", "test"):
        if not (d / f"{split}.jsonl").is_file():
            raise DataFormatError(f"{d / (split + '.jsonl')} does not exist (task folder {d.name!r})")
    meta = read_task_meta(d)
    rows = {s: _Rows(d / f"{s}.jsonl", text_key, label_key) for s in SPLITS if (d / f"{s}.jsonl").is_file()}
    if not rows["train"].rows:
        raise DataFormatError(f"{d / 'train.jsonl'} holds no examples")
    kinds = {r.kind for r in rows.values() if r.kind}
    if len(kinds) > 1:
        raise DataFormatError(f"task folder {d}: mixes classification and instruction files")
    names = [] if rows["train"].kind == "instruction" else _class_names(rows["train"], meta)
    train = _examples(rows["train"], names, None)
    seen = {e.label for e in train}
    if names:
        _check_classes(d / "train.jsonl", names, seen, from_meta="labels" in meta)
    if "dev" in rows and not rows["dev"].rows:
        raise DataFormatError(f"{d / 'dev.jsonl'} holds no examples: fill it, or delete it to hold out "
                              "data.dev_per_class examples per class of train.jsonl instead")
    splits = {s: _examples(rows[s], names, seen) if s in rows else [] for s in ("dev", "test")}
    return TaskData(d.name, names, meta.get("instruction", f"task : {d.name}"), train, splits["dev"], splits["test"])


def load_folder(root: Union[str, Path], order: Any = None, text_key: str = "text", label_key: str = "label",
                train_per_class: Optional[int] = 1000, dev_per_class: Optional[int] = 50,
                test_per_class: Optional[int] = 500, seed: int = 0) -> list[TaskData]:
    """The tasks of ``root`` in ``order``, sampled per class with ``seed`` (as MTL5)."""
    root = Path(root)
    tasks = []
    for name in resolve_folder_order(root, order):
        t = load_task(root / name, text_key, label_key)
        rng = random.Random(f"{seed}:{name}")
        held_out = not t.dev
        if t.dev:
            t.dev = sample_per_class(t.dev, dev_per_class, rng)
            t.train = sample_per_class(t.train, train_per_class, rng)
        else:
            t.train, t.dev = _split_train_dev(t.train, dev_per_class, train_per_class, rng)
        t.test = sample_per_class(t.test, test_per_class, rng)
        if not t.train and held_out:
            raise DataFormatError(
                f"task {name!r} ({root / name}) has no train examples left: there is no dev.jsonl, so "
                f"data.dev_per_class={dev_per_class} examples of each class were held out of train.jsonl for dev "
                f"and that took them all; set data.dev_per_class lower (below the smallest class's count) or add "
                "a dev.jsonl")
        for split in SPLITS:
            if not getattr(t, split):
                raise DataFormatError(f"task {name!r} ({root / name}) has no {split} examples")
        tasks.append(t)
    return tasks

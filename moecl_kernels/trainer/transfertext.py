"""A continual benchmark where transfer can show, generated offline from the standard library's
docstrings (no downloads, nothing synthetic; the sentence extraction and cleaning of ``realtext``).

Three tasks ask the *same* question with the *same* labels -- "which area of the standard
library does this sentence document?", 8 areas -- over *disjoint text sources*: every area's
source files are split into three groups (balanced by sentence count, largest file first), and
task k reads group k only. The first task has 40 training examples per class, the later two 20:

| task | text | train / dev / test per class |
| --- | --- | --- |
| ``area_a`` | source group A of each area (e.g. some networking modules) | 40 / 10 / 30 |
| ``area_b`` | group B (other modules / files of the same areas) | 20 / 10 / 30 |
| ``area_c`` | group C | 20 / 10 / 30 |

Why transfer is expected here: what tells "networking" from "email" or "concurrency" in
group A's modules (the areas' vocabulary and topics) also tells them apart in group B's and
C's, so features an adapter learns on an earlier task help a later one, which has only 20
examples per class to learn from. A shared expert that keeps what it learnt (MoE-CL) can
use them; an isolated per-task LoRA starts from scratch on every task. With per-task heads
each head still learns its task's labels from its own examples, so nothing is shared but
the backbone's adapters. Leakage is ruled out: a sentence (up to the near-duplicate key of
``realtext.dedup_key``) found in two groups or two areas is dropped everywhere.

    python -m moecl_kernels.trainer.transfertext --out data/transfertext [--seed 0]
    moecl-train data.benchmark=folder data.root=data/transfertext model.name_or_path=minilm ...

The text depends on the installed Python: ``benchmark.json`` records its version and a
SHA-256 of the data.
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path
from typing import Optional, Sequence

from . import realtext as rt

FORMAT = "moecl-transfertext-1"
AREAS = ("networking", "files and paths", "concurrency", "email", "data formats", "numbers and math",
         "testing and debugging", "archives and compression")  # realtext's areas with enough files to split
TASK_ORDER = ("area_a", "area_b", "area_c")
SIZES: dict[str, tuple[int, int, int]] = {"area_a": (40, 10, 30), "area_b": (20, 10, 30), "area_c": (20, 10, 30)}
INSTRUCTION = "Which area of the Python standard library does this sentence document?"


def split_sources(units: dict[str, list[str]], groups: int) -> list[list[str]]:
    """Units (a source file -> its sentences) into ``groups`` disjoint groups of about equal
    sentence counts: largest unit first, each into the group with the fewest sentences so far
    (ties: the lower group; deterministic given the units)."""
    out: list[list[str]] = [[] for _ in range(groups)]
    sizes = [0] * groups
    for name in sorted(units, key=lambda n: (-len(units[n]), n)):
        g = min(range(groups), key=lambda i: (sizes[i], i))
        out[g].extend(units[name])
        sizes[g] += len(units[name])
    return out


def raw_sources(areas: Sequence[str] = AREAS) -> dict[str, dict[str, list[str]]]:
    """task -> area -> candidate sentences of that task's source group."""
    root = Path(rt.sysconfig.get_paths()["stdlib"])
    raw: dict[str, dict[str, list[str]]] = {t: {} for t in TASK_ORDER}
    for area in areas:
        files = [f for m in rt.STDLIB_AREAS[area] if (p := rt._stdlib_path(m)) is not None for f in rt._py_files(p)]
        units = {str(f.relative_to(root)): rt._sentences_from_files([f], budget=10 ** 9) for f in files}
        for task, group in zip(TASK_ORDER, split_sources(units, len(TASK_ORDER))):
            raw[task][area] = group
    return raw


def clean_sources(raw: dict[str, dict[str, list[str]]]) -> dict[str, dict[str, list[str]]]:
    """``realtext.clean_classes`` over every (task, area) pair at once: a near-duplicate found
    under two areas *or two tasks' sources* is dropped from all of them (no sentence of a later
    task's test set is an earlier task's training sentence in other words)."""
    flat = {(task, area): items for task, classes in raw.items() for area, items in classes.items()}
    cleaned = rt.clean_classes({f"{t}\0{a}": v for (t, a), v in flat.items()}, set())
    out: dict[str, dict[str, list[str]]] = {t: {} for t in raw}
    for key, items in cleaned.items():
        task, area = key.split("\0")
        out[task][area] = items
    return out


def build(seed: int = 0, sizes: Optional[dict[str, Sequence[int]]] = None,
          raw: Optional[dict[str, dict[str, list[str]]]] = None) -> dict:
    """The benchmark as ``{"tasks": {name: {"labels", "instruction", "train", "dev", "test"}}, "manifest"}``;
    ``sizes``: task -> (train, dev, test) per class (default :data:`SIZES`); ``raw``: task -> area
    -> sentences (default :func:`raw_sources`, read from the installed standard library).
    Deterministic given the seed and the sources; raises when a class has too few sentences."""
    sizes = {**SIZES, **(sizes or {})}
    classes_by_task = clean_sources(raw if raw is not None else raw_sources())
    tasks = {}
    for name in TASK_ORDER:
        classes = classes_by_task[name]
        splits = rt.split_classes(classes, sizes[name], random.Random(f"transfertext:{seed}:{name}"),
                                  f"transfer task {name!r}")
        tasks[name] = {"labels": sorted(classes), "instruction": INSTRUCTION, **splits}
    manifest = {"format": FORMAT, "seed": seed, "order": list(TASK_ORDER),
                "per_class": {n: list(sizes[n]) for n in TASK_ORDER},
                "sources": {"python": rt.platform.python_version()}, "sha256": rt.content_hash(tasks)}
    return {"tasks": tasks, "manifest": manifest}


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m moecl_kernels.trainer.transfertext",
                                description="Generate the transfer benchmark (folder layout) offline.")
    p.add_argument("--out", required=True, help="output folder (one sub-folder per task + benchmark.json)")
    p.add_argument("--seed", type=int, default=0, help="which sentences go to train/dev/test (default 0)")
    a = p.parse_args(argv)
    try:
        bench = build(a.seed)
    except RuntimeError as e:
        print(f"transfertext: {e}", file=sys.stderr)
        return 1
    rt.write(bench, a.out)
    counts = {n: {s: len(t[s]) for s in ("train", "dev", "test")} for n, t in bench["tasks"].items()}
    print(f"wrote {a.out}: {counts}\nsha256 {bench['manifest']['sha256']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Task data for continual learning: MTL5 loaders, the MoE-CL task orders, per-class
sampling, dev splits, and the built-in synthetic benchmark of conflicting tasks.

MTL5 layouts (``root`` holds one folder per dataset; folder aliases are accepted):

* CSV (Zhang et al. 2015): ``<dataset>/train.csv`` and ``test.csv``, rows
  ``label,field,...`` with a 1-based label and one or more text fields (title, text,
  ...), joined by a space. No header.
* JSONL: ``<dataset>/train.jsonl``, ``dev.jsonl`` (optional), ``test.jsonl``, one
  object per line ``{"sentence": str, "label": int | str}``; an int label is 0-based,
  a string label is a class name of the dataset.

A malformed line (bad JSON or CSV, a bad label, invalid UTF-8) raises
:class:`DataFormatError` naming the file and the line. Your own tasks in one folder each:
:mod:`moecl_kernels.trainer.folder`.
"""

from __future__ import annotations

import csv
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional, Sequence, Union


class DataFormatError(ValueError):
    """A malformed data file; the message names the file and line."""


@dataclass(frozen=True)
class Example:
    text: str
    label: int  # 0-based class index (-1: instruction data, see ``answer``)
    answer: Optional[str] = None  # instruction data: the expected output (generative mode)


@dataclass
class TaskData:
    name: str
    label_names: list[str]
    instruction: str  # prompt prefix (generative mode and decoder inputs)
    train: list[Example] = field(default_factory=list)
    dev: list[Example] = field(default_factory=list)
    test: list[Example] = field(default_factory=list)

    @property
    def num_classes(self) -> int:
        return len(self.label_names)

    @property
    def is_instruction(self) -> bool:
        """Free-form ``{input, output}`` examples (no classes; generative mode only)."""
        return not self.label_names


def read_lines(path: Path) -> Iterator[tuple[int, str]]:
    """``(line number, text)`` of a UTF-8 file (a leading BOM dropped); invalid UTF-8 raises
    :class:`DataFormatError` naming the file, line and byte."""
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, 1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataFormatError(f"{path}:{line_no}: not valid UTF-8 (byte {e.start + 1} of the line is "
                                      f"{raw[e.start:e.start + 1]!r}); save the file as UTF-8") from None
            yield line_no, text[1:] if line_no == 1 and text.startswith("\ufeff") else text


def tasks_digest(tasks: Sequence[TaskData]) -> str:
    """SHA-256 of the tasks' names, classes, instructions and examples (ties results to data)."""
    import hashlib

    h = hashlib.sha256()
    for t in tasks:
        h.update(json.dumps([t.name, t.label_names, t.instruction], ensure_ascii=False).encode())
        for split in (t.train, t.dev, t.test):
            h.update(json.dumps([[e.text, e.label, e.answer] for e in split], ensure_ascii=False).encode())
    return h.hexdigest()


# ------------------------------------------------------------------------------ MTL5

MTL5_LABELS: dict[str, list[str]] = {
    "agnews": ["World", "Sports", "Business", "Sci/Tech"],
    "amazon": ["very negative", "negative", "neutral", "positive", "very positive"],
    "yelp": ["very negative", "negative", "neutral", "positive", "very positive"],
    "dbpedia": [
        "Company", "Educational Institution", "Artist", "Athlete", "Office Holder", "Mean Of Transportation",
        "Building", "Natural Place", "Village", "Animal", "Plant", "Album", "Film", "Written Work",
    ],
    "yahoo": [
        "Society & Culture", "Science & Mathematics", "Health", "Education & Reference", "Computers & Internet",
        "Sports", "Business & Finance", "Entertainment & Music", "Family & Relationships", "Politics & Government",
    ],
}
MTL5_INSTRUCTIONS = {
    "agnews": "What is the topic of this news article?",
    "amazon": "What is the sentiment of this product review?",
    "yelp": "What is the sentiment of this business review?",
    "dbpedia": "What is the category of this Wikipedia entity?",
    "yahoo": "What is the topic of this question and answer?",
}
MTL5_ALIASES = {
    "agnews": ("agnews", "ag_news", "ag_news_csv", "ag"),
    "amazon": ("amazon", "amazon_review_full_csv", "amazon_review_full"),
    "yelp": ("yelp", "yelp_review_full_csv", "yelp_review_full"),
    "dbpedia": ("dbpedia", "dbpedia_csv", "dbpedia_14"),
    "yahoo": ("yahoo", "yahoo_answers_csv", "yahoo_answers", "yahoo_answers_topics"),
}
# the three task orders of O-LoRA / MoE-CL on the 4-task MTL5 benchmark
TASK_ORDERS: dict[int, list[str]] = {
    1: ["dbpedia", "amazon", "yahoo", "agnews"],
    2: ["dbpedia", "amazon", "agnews", "yahoo"],
    3: ["yahoo", "amazon", "agnews", "dbpedia"],
}


def resolve_order(order: Union[int, str, Sequence[str]]) -> list[str]:
    """A preset number (1-3) or a list / comma-separated string of dataset names."""
    if isinstance(order, int) or (isinstance(order, str) and order.strip().isdigit()):
        k = int(order)
        if k not in TASK_ORDERS:
            raise ValueError(f"data.order preset {k} does not exist; presets: {sorted(TASK_ORDERS)}")
        return list(TASK_ORDERS[k])
    names = [s.strip() for s in order.split(",")] if isinstance(order, str) else [str(s) for s in order]
    for n in names:
        if n not in MTL5_LABELS:
            raise ValueError(f"data.order names unknown dataset {n!r}; MTL5 datasets: {sorted(MTL5_LABELS)}")
    if len(set(names)) != len(names) or not names:
        raise ValueError(f"data.order must list distinct datasets, got {names}")
    return names


def _dataset_dir(root: Path, name: str) -> Path:
    for alias in MTL5_ALIASES[name]:
        if (root / alias).is_dir():
            return root / alias
    raise FileNotFoundError(f"no folder for dataset {name!r} under {root} (looked for {', '.join(MTL5_ALIASES[name])})")


def read_csv(path: Path, num_classes: int) -> list[Example]:
    """Rows ``label,text_field[,text_field...]`` with a 1-based label."""
    out = []
    reader = csv.reader(text for _, text in read_lines(path))  # multi-line quoted fields keep working
    while True:
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as e:
            raise DataFormatError(f"{path}:{reader.line_num}: malformed CSV ({e})") from e
        line = reader.line_num
        if not row or all(not c.strip() for c in row):
            continue
        if len(row) < 2:
            raise DataFormatError(f"{path}:{line}: expected label,text[,...], got {len(row)} column(s)")
        try:
            label = int(row[0].strip())
        except ValueError:
            raise DataFormatError(f"{path}:{line}: label {row[0]!r} is not an integer") from None
        if not 1 <= label <= num_classes:
            raise DataFormatError(f"{path}:{line}: label {label} is outside 1..{num_classes}")
        text = " ".join(c.strip().replace("\\n", " ") for c in row[1:] if c.strip())
        if not text:
            raise DataFormatError(f"{path}:{line}: empty text")
        out.append(Example(text, label - 1))
    return out


def jsonl_objects(path: Path) -> Iterator[tuple[int, dict]]:
    """``(line number, object)`` of a JSON-lines file; blank lines skipped."""
    for line_no, line in read_lines(path):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError as e:
            raise DataFormatError(f"{path}:{line_no}: not valid JSON ({e})") from None
        if not isinstance(obj, dict):
            raise DataFormatError(f"{path}:{line_no}: expected a JSON object, got {type(obj).__name__}")
        yield line_no, obj


def field_text(obj: dict, key: str, where: str) -> str:
    text = obj[key]
    if not isinstance(text, str) or not text.strip():
        raise DataFormatError(f"{where}: {key!r} must be a non-empty string")
    return text.strip()


def label_index(label, label_names: Sequence[str], where: str) -> int:
    """A 0-based int label or a class name -> the class index."""
    if isinstance(label, bool) or not isinstance(label, (int, str)):
        raise DataFormatError(f"{where}: the label must be an int or a class name, got {label!r}")
    if isinstance(label, str):
        if label not in label_names:
            raise DataFormatError(f"{where}: unknown class name {label!r}; classes: {list(label_names)}")
        return list(label_names).index(label)
    if not 0 <= label < len(label_names):
        raise DataFormatError(f"{where}: label {label} is outside 0..{len(label_names) - 1}")
    return int(label)


def read_jsonl(path: Path, label_names: Sequence[str]) -> list[Example]:
    """Lines ``{"sentence": str, "label": int (0-based) | str (class name)}``."""
    out = []
    for line_no, obj in jsonl_objects(path):
        where = f"{path}:{line_no}"
        if "sentence" not in obj or "label" not in obj:
            raise DataFormatError(f"{where}: expected an object with 'sentence' and 'label'")
        out.append(Example(field_text(obj, "sentence", where), label_index(obj["label"], label_names, where)))
    return out


def sample_per_class(examples: Sequence[Example], per_class: Optional[int], rng: random.Random,
                     exclude: frozenset = frozenset()) -> list[Example]:
    """Up to ``per_class`` examples of each class (all if None), in a seeded random order.
    ``exclude`` holds indices into ``examples`` that must not be taken."""
    by_class: dict[int, list[int]] = {}
    for i, e in enumerate(examples):
        if i not in exclude:
            by_class.setdefault(e.label, []).append(i)
    chosen: list[int] = []
    for label in sorted(by_class):
        idx = by_class[label]
        rng.shuffle(idx)
        chosen.extend(idx if per_class is None else idx[:per_class])
    rng.shuffle(chosen)
    return [examples[i] for i in chosen]


def _split_train_dev(train: list[Example], dev_per_class: Optional[int], train_per_class: Optional[int],
                     rng: random.Random) -> tuple[list[Example], list[Example]]:
    """Hold ``dev_per_class`` examples of each class out of ``train``, then sample the train set."""
    dev_idx: set[int] = set()
    if dev_per_class:
        by_class: dict[int, list[int]] = {}
        for i, e in enumerate(train):
            by_class.setdefault(e.label, []).append(i)
        for label in sorted(by_class):
            idx = by_class[label]
            rng.shuffle(idx)
            dev_idx.update(idx[:dev_per_class])
    dev = [train[i] for i in sorted(dev_idx)]
    rng.shuffle(dev)
    return sample_per_class(train, train_per_class, rng, frozenset(dev_idx)), dev


def load_mtl5(root: Union[str, Path], order: Union[int, str, Sequence[str]] = 1, layout: str = "auto",
              train_per_class: Optional[int] = 1000, dev_per_class: Optional[int] = 50,
              test_per_class: Optional[int] = 500, seed: int = 0) -> list[TaskData]:
    """The MTL5 tasks of ``order``, sampled per class with ``seed`` (same seed, same examples)."""
    root = Path(root)
    tasks = []
    for name in resolve_order(order):
        d = _dataset_dir(root, name)
        labels = MTL5_LABELS[name]
        kind = layout
        if kind == "auto":
            kind = "jsonl" if (d / "train.jsonl").is_file() else "csv"
        ext = ".jsonl" if kind == "jsonl" else ".csv"
        for split in ("train", "test"):
            if not (d / f"{split}{ext}").is_file():
                raise FileNotFoundError(f"{d / (split + ext)} does not exist ({kind} layout)")
        read = (lambda p: read_jsonl(p, labels)) if kind == "jsonl" else (lambda p: read_csv(p, len(labels)))
        rng = random.Random(f"{seed}:{name}")
        train_all = read(d / f"train{ext}")
        if (d / f"dev{ext}").is_file():
            dev = sample_per_class(read(d / f"dev{ext}"), dev_per_class, rng)
            train = sample_per_class(train_all, train_per_class, rng)
        else:
            train, dev = _split_train_dev(train_all, dev_per_class, train_per_class, rng)
        test = sample_per_class(read(d / f"test{ext}"), test_per_class, rng)
        for split, items in (("train", train), ("dev", dev), ("test", test)):
            if not items:
                raise ValueError(f"dataset {name!r} ({d}) has no {split} examples (after holding out the dev split)")
        tasks.append(TaskData(name, list(labels), MTL5_INSTRUCTIONS[name], train, dev, test))
    return tasks


# ------------------------------------------------------------------------------ synthetic

SYNTHETIC_CONTENT_WORDS = (
    "apple", "river", "stone", "cloud", "tiger", "piano", "candle", "forest", "mirror", "rocket", "garden",
    "violin", "island", "lantern", "pepper", "desert", "copper", "falcon", "meadow", "pebble", "harbor",
    "thunder", "velvet", "glacier", "saddle", "orchid", "marble", "canyon", "feather", "compass", "ember", "quartz",
)
SYNTHETIC_TASK_WORDS = ("alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa",
                        "lambda", "mu", "nu", "xi", "omicron", "pi")
SYNTHETIC_CLASS_WORDS = ("north", "south", "east", "west", "up", "down", "left", "right")


def synthetic_vocabulary(num_words: int, num_tasks: int, num_classes: int) -> list[str]:
    """The words of the synthetic benchmark (the built-in tokenizer's vocabulary)."""
    if num_words > len(SYNTHETIC_CONTENT_WORDS) or num_tasks > len(SYNTHETIC_TASK_WORDS) \
            or num_classes > len(SYNTHETIC_CLASS_WORDS):
        raise ValueError(
            f"synthetic benchmark supports at most {len(SYNTHETIC_CONTENT_WORDS)} words, "
            f"{len(SYNTHETIC_TASK_WORDS)} tasks and {len(SYNTHETIC_CLASS_WORDS)} classes"
        )
    return (list(SYNTHETIC_CONTENT_WORDS[:num_words]) + ["task", ":"] + list(SYNTHETIC_TASK_WORDS[:num_tasks])
            + list(SYNTHETIC_CLASS_WORDS[:num_classes]) + ["answer"])


def synthetic_tasks(num_tasks: int = 4, num_classes: int = 2, num_words: int = 16, length: int = 8,
                    train_size: int = 400, dev_size: int = 100, test_size: int = 200, seed: int = 1234) -> list[TaskData]:
    """Conflicting tasks over one input distribution (task-incremental setting).

    An input is ``length`` content words drawn uniformly from ``num_words``. Task k
    splits the content words into ``num_classes`` equal groups by its own random
    partition; the label is the group with the most words in the input (inputs with a
    tie are redrawn). Every task sees the same kind of input and one label space, but
    the partitions disagree, so a model that is fine-tuned on task k+1 without knowing
    the task rewrites what it learnt for task k: sequential fine-tuning forgets, and a
    method must keep task-specific parameters (or know the task) to keep all rules.
    The inputs start with an instruction ``task : <name>`` naming the task.
    """
    words = list(SYNTHETIC_CONTENT_WORDS[:num_words])
    synthetic_vocabulary(num_words, num_tasks, num_classes)  # bounds check
    rng = random.Random(seed)
    tasks = []
    for k in range(num_tasks):
        order = list(range(num_words))
        rng.shuffle(order)
        group = [0] * num_words
        for pos, w in enumerate(order):
            group[w] = pos % num_classes

        def draw(n: int, r: random.Random) -> list[Example]:
            out = []
            while len(out) < n:
                idx = [r.randrange(num_words) for _ in range(length)]
                counts = [0] * num_classes
                for i in idx:
                    counts[group[i]] += 1
                top = max(counts)
                if counts.count(top) > 1:
                    continue
                out.append(Example(" ".join(words[i] for i in idx), counts.index(top)))
            return out

        r = random.Random(f"{seed}:{k}")
        name = SYNTHETIC_TASK_WORDS[k]
        tasks.append(TaskData(
            name=name, label_names=list(SYNTHETIC_CLASS_WORDS[:num_classes]), instruction=f"task : {name}",
            train=draw(train_size, r), dev=draw(dev_size, r), test=draw(test_size, r),
        ))
    return tasks

"""The real-text continual benchmark, built offline from documentation text that ships with
the installed Python and packages (no downloads, nothing synthetic).

Three sentence-classification tasks with disjoint label sets (10 / 8 / 5 classes):

* ``stdlib_area``: which area of the Python standard library a docstring sentence documents
  (networking, concurrency, dates and times, ...), from the stdlib's own source files;
* ``library``: which library a docstring sentence comes from (PyTorch, NumPy, Transformers,
  Matplotlib, SymPy, NetworkX, Pillow, Jinja) -- all installed with the trainer's dependencies;
* ``pyref_topic``: which part of the Python language reference a sentence belongs to
  (statements, expressions, data model, built-in types, names and execution), from
  ``pydoc_data.topics``.

Docstrings are read with :mod:`ast` (no module is imported), cleaned of markup and code
(doctest lines, indented blocks, section headers, parameter lines, reST roles) and split into
sentences; only sentences that read as natural language are kept (6-60 words, a capital
first letter, a final full stop, no code punctuation, at most two identifiers). Sentences
that name their own label (``numpy``, ``torch`` ...) are dropped, as are (near-)duplicates
and sentences that occur under two classes. Then, per class and seeded, ``train`` / ``dev`` /
``test`` examples are drawn.

The text depends on the installed versions, so the manifest ``benchmark.json`` records the
Python and package versions and a SHA-256 of the generated data; reports carry the hash.

    python -m moecl_kernels.trainer.realtext --out data/realtext [--seed 0]
    moecl-train data.benchmark=folder data.root=data/realtext model.name_or_path=minilm
    moecl-train data.benchmark=realtext model.name_or_path=minilm   # generates into the run folder
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import importlib.metadata
import importlib.util
import inspect
import json
import os
import platform
import random
import re
import sys
import sysconfig
from pathlib import Path
from typing import Iterable, Iterator, Optional, Sequence, Union

FORMAT = "moecl-realtext-1"
MANIFEST = "benchmark.json"
TASK_ORDER = ("stdlib_area", "library", "pyref_topic")

STDLIB_AREAS: dict[str, tuple[str, ...]] = {  # class -> stdlib modules (a .py file or a package folder)
    "networking": ("socket", "ssl", "http", "urllib", "ftplib", "imaplib", "poplib", "socketserver", "xmlrpc",
                   "ipaddress", "selectors", "wsgiref", "webbrowser"),
    "text processing": ("re", "string", "textwrap", "difflib", "shlex", "gettext", "locale", "codecs", "stringprep",
                        "html", "pprint", "reprlib"),
    "files and paths": ("os", "pathlib", "shutil", "glob", "fnmatch", "tempfile", "filecmp", "fileinput", "stat",
                        "posixpath", "ntpath", "genericpath", "_pyio", "linecache"),
    "concurrency": ("threading", "multiprocessing", "asyncio", "concurrent", "queue", "sched", "subprocess",
                    "_threading_local", "contextvars"),
    "email": ("email", "mailbox", "mimetypes", "smtplib", "quopri", "base64"),
    "data formats": ("json", "csv", "pickle", "pickletools", "copyreg", "shelve", "configparser", "plistlib", "xml",
                     "tomllib", "dbm", "sqlite3", "struct"),
    "numbers and math": ("_pydecimal", "fractions", "statistics", "random", "numbers", "secrets", "bisect", "heapq",
                         "colorsys"),
    "testing and debugging": ("unittest", "doctest", "pdb", "bdb", "trace", "traceback", "cProfile", "profile",
                              "pstats", "timeit", "tracemalloc", "warnings"),
    "logging": ("logging",),
    "archives and compression": ("zipfile", "tarfile", "gzip", "bz2", "lzma", "zipimport", "zipapp", "_compression"),
}
LIBRARIES: dict[str, tuple[str, ...]] = {  # class -> import name, then words that give the label away
    "PyTorch": ("torch", "torch", "pytorch"),
    "NumPy": ("numpy", "numpy", "np"),
    "Transformers": ("transformers", "transformers", "hugging", "huggingface", "hf"),
    "Matplotlib": ("matplotlib", "matplotlib", "mpl", "pyplot", "plt"),
    "SymPy": ("sympy", "sympy"),
    "NetworkX": ("networkx", "networkx", "nx"),
    "Pillow": ("PIL", "pil", "pillow"),
    "Jinja": ("jinja2", "jinja", "jinja2"),
}
PYREF_TOPICS: dict[str, tuple[str, ...]] = {  # class -> pydoc_data.topics keys
    "statements": ("compound", "assert", "assignment", "augassign", "break", "continue", "del", "pass", "raise",
                   "return", "if", "while", "for", "try", "with", "else", "async", "global", "nonlocal", "import",
                   "function", "class"),
    "expressions": ("atom-identifiers", "atom-literals", "attribute-references", "binary", "bitwise", "booleans",
                    "calls", "comparisons", "exprlists", "lambda", "operator-summary", "power", "shifting", "slicings",
                    "subscriptions", "unary", "in", "conversions", "await", "yield", "lists", "dict", "strings",
                    "integers", "floating", "imaginary", "numbers"),
    "data model": ("specialnames", "customization", "attribute-access", "numeric-types", "sequence-types",
                   "callable-types", "context-managers", "specialattrs", "types", "objects"),
    "built-in types": ("typesseq", "typesseq-mutable", "typesmapping", "string-methods", "typesmethods",
                       "typesmodules", "typesfunctions", "truth", "bltin-code-objects", "bltin-ellipsis-object",
                       "bltin-null-object", "bltin-type-objects", "formatstrings"),
    "names and execution": ("execmodel", "naming", "dynamic-features", "exceptions", "identifiers", "id-classes",
                            "debugger"),
}
SIZES: dict[str, tuple[int, int, int]] = {  # task -> (train, dev, test) examples per class
    "stdlib_area": (100, 20, 60), "library": (100, 20, 60), "pyref_topic": (80, 20, 40),
}
INSTRUCTIONS = {
    "stdlib_area": "Which area of the Python standard library does this sentence document?",
    "library": "Which Python library's documentation is this sentence from?",
    "pyref_topic": "Which part of the Python language reference is this sentence from?",
}
SKIP_DIRS = frozenset({"test", "tests", "testing", "idle_test", "__pycache__", "_vendor", "vendored", "site-packages"})
_SECTIONS_DROPPED = frozenset({"examples", "example", "see also", "references", "reference", ".. rubric::", "usage"})
_SECTION_NAMES = _SECTIONS_DROPPED | {"args", "arguments", "returns", "raises", "note", "parameters", "attributes"}
_ROLE = re.compile(r":[a-zA-Z_:]+:`~?([^`<]*?)(?:\s*<[^>]*>)?`")  # :func:`~a.b` -> a.b
_CODE_CHARS = re.compile(r"[=\{\}\[\]<>\\|$@#~^*]|->|::|\.\.\.|https?:|www\.")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'(])")
_PARAM_LINE = re.compile(r"^\*{0,2}[A-Za-z_][\w, *]*\s*:(\s+\S.*)?$")  # "x : int" / "x, y : array_like"
_IDENTIFIER = re.compile(r"\w[._]\w|\w\(|^_")  # a.b, snake_case, call(, _private
_PLAIN_WORD = re.compile(r"[\"'(]?[A-Za-z][a-z'-]*[.,;:)\"']*")  # a word, maybe capitalised or punctuated
_GOOGLE_ARG = re.compile(r"^\*{0,2}[A-Za-z_]\w*\s*(\([^)]*\))?:\s+")  # "x (int): The input." -> "The input."


# ------------------------------------------------------------------------------ text cleaning

def _strip_markup(text: str) -> str:
    text = _ROLE.sub(lambda m: m.group(1).split(".")[-1], text)
    text = re.sub(r"``([^`]*)``", r"\1", text)
    text = re.sub(r"`([^`<]*?)(?:\s*<[^>]*>)?`_{0,2}", r"\1", text)
    text = re.sub(r"\*{1,2}([^*\s][^*]*?)\*{1,2}", r"\1", text)  # *emphasis*
    text = re.sub(r"\s*\[(\d+|#)\]_?", "", text)  # footnote marks
    text = text.replace("\u2019", "'").replace("\u201c", '"').replace("\u201d", '"')
    return re.sub(r"\s+", " ", text).strip()


def _underline(line: str) -> bool:
    return len(line) >= 3 and set(line) <= set("-=~^")


def docstring_paragraphs(doc: str) -> list[str]:
    """Natural-language paragraphs of a docstring: code, doctests, section headers,
    parameter/type lines, directives and "Examples"/"See Also" sections removed."""
    lines = inspect.cleandoc(doc).splitlines()
    paras: list[str] = []
    para: list[str] = []

    def flush() -> None:
        if para:
            paras.append(" ".join(para))
            para.clear()

    skipping = False  # inside a dropped section
    i = 0
    while i < len(lines):
        line = lines[i].rstrip()
        stripped = line.strip()
        underlined = i + 1 < len(lines) and _underline(lines[i + 1].strip())  # numpydoc "Parameters\n-----"
        if underlined or (stripped.endswith(":") and stripped[:-1].strip().lower() in _SECTION_NAMES):  # "Args:"
            flush()
            skipping = stripped.rstrip(":").strip().lower() in _SECTIONS_DROPPED
            i += 2 if underlined else 1
            continue
        if not stripped or stripped.startswith((">>>", "...", ".. ", "|", "+-", "$ ")) or line.startswith(" " * 8):
            flush()  # a blank line, a doctest, a directive, a table or an indented code block
        elif not skipping:
            if _PARAM_LINE.match(stripped) and len(stripped.split()) <= 6:
                flush()  # "x : int": the description below it is kept
            else:
                para.append(_GOOGLE_ARG.sub("", stripped))
        i += 1
    flush()
    return paras


def text_paragraphs(text: str) -> Iterator[str]:
    """Paragraphs of plain documentation text (``pydoc_data.topics``): indented code and
    grammar blocks and underlined titles removed; definition bodies kept."""
    para: list[str] = []
    base = None
    for raw in text.splitlines() + [""]:
        stripped = raw.strip()
        indent = len(raw) - len(raw.lstrip(" "))
        if not stripped or set(stripped) <= set("*=-~^"):
            if para:
                yield " ".join(para)
            para, base = [], None
            continue
        if base is None:
            base = indent
        if indent > base or "::=" in stripped or stripped.startswith((">>>", "...")):
            if para:
                yield " ".join(para)
            para = []
            continue
        para.append(stripped)


def sentences(paragraph: str) -> Iterator[str]:
    """The sentences of a paragraph that read as natural language."""
    for s in _SENTENCE_END.split(_strip_markup(paragraph)):
        s = s.strip()
        words = s.split()
        if not 5 <= len(words) <= 60 or not s[0].isupper() or not s.endswith((".", ".\"", ".'", ".)")) \
                or s.endswith(("e.g.", "i.e.")):
            continue  # a fragment, a title or a run-on
        if _CODE_CHARS.search(s) or s.count("(") != s.count(")") or s.count('"') % 2:
            continue  # code punctuation, or cut in the middle of a quote
        identifiers = sum(1 for w in words if _IDENTIFIER.search(w.strip(".,;:()\"'")))
        plain = sum(1 for w in words if _PLAIN_WORD.fullmatch(w))
        if identifiers <= 2 and plain >= 0.75 * len(words):
            yield s


def dedup_key(sentence: str) -> str:
    """Near-duplicate key: the lower-case words (templated text that differs only in names
    such as ``BertModel`` / ``GPT2Model`` collides)."""
    return " ".join(w for w in re.findall(r"[A-Za-z]+", sentence) if w.islower())


# ------------------------------------------------------------------------------ sources

def _py_files(root: Path) -> list[Path]:
    if root.is_file():
        return [root]
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS and not d.startswith("."))
        out.extend(Path(dirpath) / f for f in sorted(filenames) if f.endswith(".py"))
    # a stable order that does not follow the alphabet (the budget below stops early)
    return sorted(out, key=lambda p: hashlib.sha1(str(p.relative_to(root.parent)).encode()).hexdigest())


def docstrings(path: Path) -> Iterator[str]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return
    if '"""' not in text and "'''" not in text:
        return
    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError):
        return
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=False)
            if doc:
                yield doc


def _sentences_from_files(files: Iterable[Path], budget: int) -> list[str]:
    out: list[str] = []
    for f in files:
        for doc in docstrings(f):
            for para in docstring_paragraphs(doc):
                out.extend(sentences(para))
        if len(out) >= budget:
            break
    return out


def _stdlib_path(module: str) -> Optional[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    for p in (root / f"{module}.py", root / module):
        if p.exists():
            return p
    return None


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"the real-text benchmark needs the installed package {name!r}, which was not found")
    return Path(list(spec.submodule_search_locations)[0])


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def source_versions() -> dict[str, str]:
    dists = {"torch": "torch", "numpy": "numpy", "transformers": "transformers", "matplotlib": "matplotlib",
             "sympy": "sympy", "networkx": "networkx", "PIL": "pillow", "jinja2": "jinja2"}
    return {"python": platform.python_version(), **{d: _version(d) for d in dists.values()}}


def raw_classes(budget: int) -> dict[str, dict[str, list[str]]]:
    """task -> class -> candidate sentences (before dedup and sampling)."""
    stdlib = {}
    for label, modules in STDLIB_AREAS.items():
        files = [f for m in modules if (p := _stdlib_path(m)) is not None for f in _py_files(p)]
        stdlib[label] = _sentences_from_files(files, budget=10 ** 9)
    libs = {}
    for label, (module, *_) in LIBRARIES.items():
        libs[label] = _sentences_from_files(_py_files(_package_dir(module)), budget)
    from pydoc_data.topics import topics

    pyref = {label: [s for key in keys if key in topics for para in text_paragraphs(topics[key]) for s in sentences(para)]
             for label, keys in PYREF_TOPICS.items()}
    return {"stdlib_area": stdlib, "library": libs, "pyref_topic": pyref}


def _giveaways(task: str) -> set[str]:
    if task == "library":
        return {w.lower() for _, *words in LIBRARIES.values() for w in words}
    return set()


def clean_classes(raw: dict[str, list[str]], giveaways: set[str]) -> dict[str, list[str]]:
    """Distinct sentences per class (near-duplicates, sentences of two classes and those
    naming a label dropped), sorted for a seed-only dependence on the sources."""
    seen: dict[str, set[str]] = {}
    for label, items in raw.items():
        for s in items:
            seen.setdefault(dedup_key(s), set()).add(label)
    out: dict[str, list[str]] = {}
    for label, items in raw.items():
        keep: dict[str, str] = {}
        for s in items:
            key = dedup_key(s)
            words = {w.lower() for w in re.findall(r"[A-Za-z0-9]+", s)}
            if len(seen[key]) == 1 and key not in keep and not words & giveaways:
                keep[key] = s
        out[label] = sorted(keep.values())
    return out


# ------------------------------------------------------------------------------ the benchmark

def build(seed: int = 0, sizes: Optional[dict[str, Sequence[int]]] = None, budget: int = 1000) -> dict:
    """The benchmark as ``{"tasks": {name: {"labels", "instruction", "train", "dev", "test"}}, "manifest"}``
    (``train`` etc. are lists of ``{"text", "label"}``); ``sizes``: task -> (train, dev, test)
    examples per class (default :data:`SIZES`); ``budget``: candidate sentences read per
    library. Deterministic given the seed and the installed sources; raises when a class has
    too few sentences."""
    sizes = {**SIZES, **(sizes or {})}
    raw = raw_classes(budget)
    tasks = {}
    for name in TASK_ORDER:
        classes = clean_classes(raw[name], _giveaways(name))
        splits = split_classes(classes, sizes[name], random.Random(f"realtext:{seed}:{name}"), f"real-text task {name!r}")
        tasks[name] = {"labels": sorted(classes), "instruction": INSTRUCTIONS[name], **splits}
    manifest = {"format": FORMAT, "seed": seed, "order": list(TASK_ORDER), "budget": budget,
                "per_class": {n: list(sizes[n]) for n in TASK_ORDER}, "sources": source_versions(),
                "sha256": content_hash(tasks)}
    return {"tasks": tasks, "manifest": manifest}


def split_classes(classes: dict[str, list[str]], per_class: Sequence[int], rng: random.Random,
                  what: str) -> dict[str, list[dict]]:
    """``{"train", "dev", "test"}`` lists of ``{"text", "label"}``: ``per_class`` = (train, dev,
    test) sentences of each class (sorted labels), drawn with ``rng``, each split shuffled;
    raises naming ``what`` and the class when a class has too few."""
    n_train, n_dev, n_test = (int(v) for v in per_class)
    need = n_train + n_dev + n_test
    splits: dict[str, list[dict]] = {"train": [], "dev": [], "test": []}
    for label in sorted(classes):
        pool = list(classes[label])
        if len(pool) < need:
            raise RuntimeError(f"{what} class {label!r} has {len(pool)} sentences, needs {need} "
                               f"({n_train}+{n_dev}+{n_test} per class)")
        rng.shuffle(pool)
        splits["train"].extend({"text": s, "label": label} for s in pool[:n_train])
        splits["dev"].extend({"text": s, "label": label} for s in pool[n_train:n_train + n_dev])
        splits["test"].extend({"text": s, "label": label} for s in pool[n_train + n_dev:need])
    for items in splits.values():
        rng.shuffle(items)
    return splits


def content_hash(tasks: dict) -> str:
    return hashlib.sha256(json.dumps(tasks, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def write(bench: dict, out: Union[str, Path]) -> Path:
    """Writes the ``folder`` layout: ``out/<task>/{train,dev,test}.jsonl`` + ``task.json``,
    and ``out/benchmark.json`` (the manifest) last."""
    out = Path(out)
    for name, t in bench["tasks"].items():
        d = out / name
        d.mkdir(parents=True, exist_ok=True)
        for split in ("train", "dev", "test"):
            (d / f"{split}.jsonl").write_text("".join(json.dumps(e, ensure_ascii=False) + "\n" for e in t[split]),
                                              encoding="utf-8")
        (d / "task.json").write_text(json.dumps({"labels": t["labels"], "instruction": t["instruction"]}, indent=1))
    (out / MANIFEST).write_text(json.dumps(bench["manifest"], indent=1, sort_keys=True))
    return out


def ensure(out: Union[str, Path], seed: int = 0) -> dict:
    """The manifest of the default-size benchmark in ``out``, generated there first unless
    ``out`` already holds one of the same seed."""
    out = Path(out)
    path = out / MANIFEST
    if path.is_file():
        m = json.loads(path.read_text())
        if m.get("format") == FORMAT and m.get("seed") == seed and m.get("per_class") == {n: list(v) for n, v in SIZES.items()}:
            return m
    write(build(seed), out)
    return json.loads(path.read_text())


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m moecl_kernels.trainer.realtext",
                                description="Generate the real-text continual benchmark (folder layout) offline.")
    p.add_argument("--out", help="output folder (one sub-folder per task + benchmark.json)")
    p.add_argument("--seed", type=int, default=0, help="which sentences go to train/dev/test (default 0)")
    p.add_argument("--stats", action="store_true", help="print the sentences per class (raw, kept) and exit")
    a = p.parse_args(argv)
    if a.stats:
        for task, classes in raw_classes(1000).items():
            cleaned = clean_classes(classes, _giveaways(task))
            print(task, {k: (len(v), len(cleaned[k])) for k, v in classes.items()})
        return 0
    if not a.out:
        p.error("--out is required")
    try:
        bench = build(a.seed)
    except RuntimeError as e:
        print(f"realtext: {e}", file=sys.stderr)
        return 1
    write(bench, a.out)
    m = bench["manifest"]
    counts = {n: {s: len(t[s]) for s in ("train", "dev", "test")} for n, t in bench["tasks"].items()}
    print(f"wrote {a.out}: {counts}\nsha256 {m['sha256']}\nsources {m['sources']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

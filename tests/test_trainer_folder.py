"""``data.benchmark: folder`` (your own tasks: one folder each, JSONL, string or int labels,
task.json, instruction data), data errors with file:line (encoding included), and the
real-text benchmark's generator (its text cleaning fast; the real build marked slow)."""

import json
from collections import Counter
from pathlib import Path

import pytest

from moecl_kernels.trainer import realtext
from moecl_kernels.trainer.config import load_config
from moecl_kernels.trainer.data import DataFormatError, read_csv, read_jsonl
from moecl_kernels.trainer.engine import prepare, run
from moecl_kernels.trainer.folder import load_folder, load_task, resolve_folder_order


def _write(path: Path, rows) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def _task(root: Path, name: str, labels, per_class=4, dev=True, key="text", meta=None) -> Path:
    d = root / name
    for split, n in (("train", per_class), ("dev", 2), ("test", 3)):
        if split == "dev" and not dev:
            continue
        _write(d / f"{split}.jsonl", [{key: f"{name} {split} {lab} {i}", "label": lab} for i in range(n) for lab in labels])
    if meta is not None:
        (d / "task.json").write_text(json.dumps(meta))
    return d


def test_string_labels_sorted_and_order_default_sorted(tmp_path):
    _task(tmp_path, "zeta", ["spam", "ham", "eggs"])
    _task(tmp_path, "alpha", ["x", "y"], key="sentence")
    tasks = load_folder(tmp_path, train_per_class=None, dev_per_class=None, test_per_class=None)
    assert [t.name for t in tasks] == ["alpha", "zeta"]
    z = tasks[1]
    assert z.label_names == ["eggs", "ham", "spam"] and z.instruction == "task : zeta"
    assert Counter(z.label_names[e.label] for e in z.train) == {"spam": 4, "ham": 4, "eggs": 4}
    assert all(e.text.startswith("zeta train " + z.label_names[e.label]) for e in z.train)
    assert len(z.dev) == 6 and len(z.test) == 9
    assert [t.name for t in load_folder(tmp_path, "zeta, alpha")] == ["zeta", "alpha"]
    assert [t.name for t in load_folder(tmp_path, ["zeta"])] == ["zeta"]


def test_task_json_labels_and_instruction_int_labels_and_keys(tmp_path):
    _task(tmp_path, "a", ["neg", "pos"], meta={"labels": ["pos", "neg"], "instruction": "Sentiment?"})
    d = tmp_path / "b"
    for split in ("train", "test"):
        _write(d / f"{split}.jsonl", [{"body": f"b {split} {i}", "y": i % 3} for i in range(9)])
    a = load_task(tmp_path / "a")
    assert a.label_names == ["pos", "neg"] and a.instruction == "Sentiment?"
    assert all(e.text.split()[2] == a.label_names[e.label] for e in a.train + a.test)
    b = load_folder(tmp_path, ["b"], text_key="body", label_key="y", dev_per_class=1)[0]
    assert b.label_names == ["0", "1", "2"]
    assert Counter(e.label for e in b.dev) == {0: 1, 1: 1, 2: 1}  # held out of train, per class
    assert len(b.train) == 6 and not set(b.train) & set(b.dev)


def test_per_class_sampling_is_seeded(tmp_path):
    _task(tmp_path, "a", ["p", "q"], per_class=10)
    x, y, z = (load_folder(tmp_path, train_per_class=3, dev_per_class=1, test_per_class=2, seed=s)[0] for s in (1, 1, 2))
    assert Counter(e.label for e in x.train) == {0: 3, 1: 3} and len(x.dev) == 2 and len(x.test) == 4
    assert x.train == y.train and x.train != z.train


@pytest.mark.parametrize("split, row, msg", [
    ("test", {"text": "t", "label": "unseen"}, r"test\.jsonl:\d+: label 'unseen' does not occur in .*train\.jsonl"),
    ("dev", {"text": "t", "label": 7}, r"dev\.jsonl:\d+: label 7 is outside 0\.\.1"),
    ("train", {"text": "t", "label": 1}, r"train\.jsonl:\d+: mixes class-name and integer labels"),
    ("train", {"txt": "t", "label": "p"}, r"train\.jsonl:\d+: no text: expected the key 'text' \(or 'sentence'\)"),
    ("train", {"text": "t"}, r"train\.jsonl:\d+: expected \{'text': \.\.\., 'label': \.\.\.\}"),
    ("train", {"input": "i", "output": "o"}, r"train\.jsonl:\d+: a instruction line in a file of classification"),
    ("test", "[1, 2]", r"test\.jsonl:\d+: expected a JSON object"),
])
def test_bad_lines_name_file_and_line(tmp_path, split, row, msg):
    labels = ["p", "q"] if split != "dev" else [0, 1]
    _task(tmp_path, "a", labels)
    with open(tmp_path / "a" / f"{split}.jsonl", "a") as f:
        f.write((row if isinstance(row, str) else json.dumps(row)) + "\n")
    with pytest.raises(DataFormatError, match=msg):
        load_folder(tmp_path)


def test_order_and_root_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="data.root: directory .* does not exist"):
        resolve_folder_order(tmp_path / "nope")
    _task(tmp_path, "a", ["p", "q"])
    with pytest.raises(ValueError, match="names task 'b'.*task folders: \\['a'\\]"):
        load_folder(tmp_path, "a,b")
    with pytest.raises(ValueError, match="twice"):
        load_folder(tmp_path, ["a", "a"])


@pytest.mark.parametrize("kind", ["folder", "mtl5_jsonl", "mtl5_csv"])
def test_invalid_utf8_names_file_line_and_byte(tmp_path, kind):
    good = "caf\u00e9 ok".encode()
    if kind == "mtl5_csv":
        p = tmp_path / "train.csv"
        p.write_bytes(b'"1","' + good + b'"\n"2","bad \xff byte"\n')
        call = lambda: read_csv(p, 4)  # noqa: E731
    else:
        p = tmp_path / "a" / "train.jsonl"
        p.parent.mkdir()
        key = b"text" if kind == "folder" else b"sentence"
        p.write_bytes(b'{"' + key + b'": "' + good + b'", "label": 0}\n{"' + key + b'": "bad \xe9t\xe9", "label": 1}\n')
        (p.parent / "test.jsonl").write_bytes(p.read_bytes().splitlines(keepends=True)[0])
        call = (lambda: load_task(p.parent)) if kind == "folder" else (lambda: read_jsonl(p, ["a", "b"]))  # noqa: E731
    with pytest.raises(DataFormatError, match=r"train\.(jsonl|csv):2: not valid UTF-8 \(byte \d+ of the line is b'\\x(ff|e9)'\)"):
        call()


def _instruction_task(root: Path) -> None:
    for split, n in (("train", 12), ("test", 4)):
        _write(root / "qa" / f"{split}.jsonl",
               [{"instruction": "Repeat the word.", "input": w, "output": w} for w in ["apple", "pear", "plum", "fig"] * (n // 4)])


def test_instruction_data_trains_generatively_and_is_refused_for_classification(tmp_path):
    _instruction_task(tmp_path / "d")
    t = load_folder(tmp_path / "d", dev_per_class=2)[0]
    assert t.is_instruction and t.label_names == [] and len(t.dev) == 2 and len(t.train) == 10
    assert {e.answer for e in t.train} <= {"apple", "pear", "plum", "fig"}
    assert all(e.text.startswith("Repeat the word.\n") for e in t.train)
    base = [f"output_dir={tmp_path}", "data.benchmark=folder", f"data.root={tmp_path / 'd'}", "data.dev_per_class=2",
            "methods=[seq_lora]", "train.epochs=1", "train.batch_size=4", "data.max_length=48"]
    with pytest.raises(ValueError, match="instruction data .* needs train.mode=generative"):
        prepare(load_config(None, base))
    res = run(load_config(None, [*base, "train.mode=generative", "name=gen"]))["seq_lora"]
    assert len(res["R"]) == 1 and 0.0 <= res["R"][0][0] <= 1.0 and len(res["data_sha256"]) == 64


# ------------------------------------------------------------------------------ real-text generator

def test_docstring_cleaning_keeps_prose_and_drops_code():
    doc = '''Return the frobnicated copy of the input array.

    The copy is made lazily, so that large inputs are cheap to pass around.

    Parameters
    ----------
    x : array_like
        The values that are frobnicated in place of the caller.
    axis : int

    Examples
    --------
    >>> frob(x)
    The example output is not documentation prose at all.

    Args:
        y (int): The number of times the input is processed again.

    .. note:: See :func:`numpy.frob` and ``frob_all`` for a faster way to do it.
    '''
    got = [s for p in realtext.docstring_paragraphs(doc) for s in realtext.sentences(p)]
    assert got == ["Return the frobnicated copy of the input array.",
                   "The copy is made lazily, so that large inputs are cheap to pass around.",
                   "The values that are frobnicated in place of the caller.",
                   "The number of times the input is processed again."]
    assert list(realtext.sentences("Set x = 3 when the value of the flag is true.")) == []
    assert list(realtext.sentences("Call a_b.c_d() and e_f.g() then h_i.j() for the full effect.")) == []
    text = "Title\n*****\n\nThe statement binds the name in the local namespace.\n\n   code_block = 1\n"
    assert [s for p in realtext.text_paragraphs(text) for s in realtext.sentences(p)] == [
        "The statement binds the name in the local namespace."]


def test_clean_classes_drops_duplicates_across_classes_and_giveaways():
    raw = {"A": ["The BertModel returns hidden states.", "The GPT2Model returns hidden states.", "Shared words here now."],
           "B": ["Shared words here now.", "Uses numpy arrays for the values.", "A unique sentence of class B."]}
    got = realtext.clean_classes(raw, {"numpy"})
    assert got == {"A": ["The BertModel returns hidden states."], "B": ["A unique sentence of class B."]}


def test_written_benchmark_loads_as_a_folder(tmp_path):
    tasks = {n: {"labels": ["a", "b"], "instruction": f"{n}?",
                 **{s: [{"text": f"{n} {s} {i}", "label": "ab"[i % 2]} for i in range(4)] for s in ("train", "dev", "test")}}
             for n in ("second", "first")}
    realtext.write({"tasks": tasks, "manifest": {"order": ["second", "first"], "sha256": realtext.content_hash(tasks)}},
                   tmp_path)
    loaded = load_folder(tmp_path)
    assert [t.name for t in loaded] == ["second", "first"]  # the manifest's order, not sorted
    assert loaded[0].instruction == "second?" and len(loaded[0].train) == 4


@pytest.mark.slow
def test_realtext_benchmark_is_deterministic_disjoint_and_learnable_sized(tmp_path):
    a = realtext.build(seed=0)
    b = realtext.build(seed=0)
    assert a["manifest"]["sha256"] == b["manifest"]["sha256"] == realtext.content_hash(a["tasks"])
    assert realtext.build(seed=1)["manifest"]["sha256"] != a["manifest"]["sha256"]
    tasks = a["tasks"]
    assert [len(tasks[n]["labels"]) for n in realtext.TASK_ORDER] == [10, 8, 5]
    labels = [set(t["labels"]) for t in tasks.values()]
    assert not (labels[0] & labels[1] or labels[0] & labels[2] or labels[1] & labels[2])
    total = sum(len(t[s]) for t in tasks.values() for s in ("train", "dev", "test"))
    assert 3000 <= total <= 10000
    for name, t in tasks.items():
        n_train, n_dev, n_test = realtext.SIZES[name]
        assert Counter(e["label"] for e in t["train"]) == {lab: n_train for lab in t["labels"]}
        texts = [e["text"] for s in ("train", "dev", "test") for e in t[s]]
        assert len(set(texts)) == len(texts)  # no example in two splits
    m = a["manifest"]
    assert {"python", "torch", "numpy", "transformers", "matplotlib"} <= set(m["sources"])
    realtext.write(a, tmp_path)
    assert [t.name for t in load_folder(tmp_path)] == list(realtext.TASK_ORDER)


def test_cli_data_errors_are_one_line_and_exit_2(tmp_path, capsys):
    from moecl_kernels.trainer import cli
    from moecl_kernels.trainer.config import ConfigError

    _task(tmp_path / "d", "a", ["p", "q"])
    (tmp_path / "d" / "a" / "test.jsonl").write_bytes(b'{"text": "fine", "label": "p"}\n{"text": "\xff", "label": "q"}\n')
    assert cli.main([f"output_dir={tmp_path}", "data.benchmark=folder", f"data.root={tmp_path / 'd'}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("moecl-train: data error: ") and "test.jsonl:2: not valid UTF-8" in err[0]
    (tmp_path / "d" / "a" / "test.jsonl").unlink()
    with pytest.raises(ConfigError, match="has no test.jsonl"):
        load_config(None, ["data.benchmark=folder", f"data.root={tmp_path / 'd'}"])


@pytest.mark.parametrize("files", [("train.json", "test.jsonl"), ("test.jsonl",), ("train.jsonl", "test.json")])
def test_a_sub_folder_that_is_not_a_task_is_an_error_naming_it(tmp_path, files):
    """Issue 24 item 1: a misnamed file must not drop the task silently (the run would report fewer tasks)."""
    _task(tmp_path, "a", ["p", "q"])
    for f in files:
        _write(tmp_path / "b" / f, [{"text": "t", "label": "p"}, {"text": "u", "label": "q"}])
    (tmp_path / ".cache").mkdir()  # hidden folders are not tasks
    missing = "train.jsonl" if "train.jsonl" not in files else "test.jsonl"
    with pytest.raises(DataFormatError, match=f"sub-folder 'b' is not a task folder: it has no {missing}"):
        load_folder(tmp_path)
    with pytest.raises(ValueError, match="sub-folder 'b'"):
        load_config(None, ["data.benchmark=folder", f"data.root={tmp_path}"])


@pytest.mark.parametrize("labels, msg", [
    ([1, 2, 3], r"train\.jsonl: the int labels run 1\.\.3 but labels are 0-based class indices"),
    ([0, 2], r"train\.jsonl: int labels are 0-based class indices, but classes \[1\] of 0\.\.2 have no example"),
    (["only"], r"train\.jsonl: every example has the label 'only': a classification task needs at least two"),
    ([0], r"every example has the label '0'"),
])
def test_labels_that_would_be_misread_are_errors(tmp_path, labels, msg):
    """Issue 24 item 5: 1..K labels made a phantom class 0; a one-class task reported 100 %."""
    _task(tmp_path, "a", labels)
    with pytest.raises(DataFormatError, match=msg):
        load_folder(tmp_path)


def test_dev_hold_out_that_empties_train_names_the_setting(tmp_path):
    """Issue 24 item 9: no dev.jsonl, fewer examples per class than data.dev_per_class."""
    _task(tmp_path, "a", ["p", "q"], per_class=45, dev=False)
    with pytest.raises(DataFormatError, match=r"no train examples left: there is no dev\.jsonl, so "
                                              r"data\.dev_per_class=50 .*set data\.dev_per_class lower"):
        load_folder(tmp_path, dev_per_class=50)
    assert len(load_folder(tmp_path, dev_per_class=5)[0].train) == 80
    (tmp_path / "a" / "dev.jsonl").write_text("")
    with pytest.raises(DataFormatError, match=r"dev\.jsonl holds no examples: fill it, or delete it"):
        load_folder(tmp_path)

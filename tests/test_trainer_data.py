"""MTL5 loaders (CSV and JSONL layouts, malformed input), task orders, per-class
sampling, dev splits, the synthetic benchmark and the built-in tokenizer."""

import shutil
from collections import Counter
from pathlib import Path

import pytest

from moecl_kernels.trainer.data import (MTL5_LABELS, TASK_ORDERS, DataFormatError, load_mtl5, read_csv, read_jsonl,
                                        resolve_order, synthetic_tasks, synthetic_vocabulary)
from moecl_kernels.trainer.tokenizer import BuiltinTokenizer

FIX = Path(__file__).parent / "fixtures"


@pytest.mark.parametrize("layout", ["csv", "jsonl"])
def test_mtl5_layouts_load_every_order(layout):
    root = FIX / f"mtl5_{layout}"
    for k, names in TASK_ORDERS.items():
        tasks = load_mtl5(root, order=k, layout="auto", train_per_class=2, dev_per_class=1, test_per_class=None)
        assert [t.name for t in tasks] == names
        for t in tasks:
            C = len(MTL5_LABELS[t.name])
            assert t.label_names == MTL5_LABELS[t.name]
            assert Counter(e.label for e in t.train) == {c: 2 for c in range(C)}
            assert Counter(e.label for e in t.dev) == {c: 1 for c in range(C)}
            assert Counter(e.label for e in t.test) == {c: 2 for c in range(C)}
            assert all(e.text for e in t.train + t.dev + t.test)


def test_csv_joins_title_and_text_and_holds_dev_out_of_train():
    tasks = load_mtl5(FIX / "mtl5_csv", order="agnews", train_per_class=None, dev_per_class=1, test_per_class=None)
    t = tasks[0]
    assert t.train[0].text.startswith("agnews title")
    assert "train text of class" in t.train[0].text
    assert len(t.train) == 4 * 3 and len(t.dev) == 4  # 4 per class in the file, 1 per class held out
    assert not set(t.train) & set(t.dev)


def test_jsonl_labels_by_index_and_by_name():
    ex = read_jsonl(FIX / "mtl5_jsonl" / "agnews" / "dev.jsonl", MTL5_LABELS["agnews"])
    assert [e.label for e in ex] == [0, 1, 2, 3]


def test_sampling_is_seeded():
    a, b, c = (load_mtl5(FIX / "mtl5_csv", order=1, train_per_class=2, dev_per_class=1, seed=s) for s in (3, 3, 4))
    assert [t.train for t in a] == [t.train for t in b]
    assert [t.train for t in a] != [t.train for t in c]


@pytest.mark.parametrize("line, msg", [
    ('"9","title","text"\n', "outside 1..4"),
    ('"x","title","text"\n', "not an integer"),
    ('"1"\n', "column"),
    ('"1",""\n', "empty text"),
])
def test_malformed_csv_names_file_and_line(tmp_path, line, msg):
    p = tmp_path / "train.csv"
    shutil.copy(FIX / "mtl5_csv" / "ag_news_csv" / "train.csv", p)
    n = sum(1 for _ in open(p))
    with open(p, "a") as f:
        f.write(line)
    with pytest.raises(DataFormatError, match=rf"train\.csv:{n + 1}: .*{msg}"):
        read_csv(p, 4)


@pytest.mark.parametrize("line, msg", [
    ("{not json\n", "not valid JSON"),
    ('{"sentence": "a"}\n', "'sentence' and 'label'"),
    ('{"sentence": "a", "label": 7}\n', "outside 0..3"),
    ('{"sentence": "a", "label": "Weather"}\n', "unknown class name"),
    ('{"sentence": "", "label": 1}\n', "non-empty string"),
    ('{"sentence": "a", "label": true}\n', "int or a class name"),
])
def test_malformed_jsonl_names_file_and_line(tmp_path, line, msg):
    p = tmp_path / "train.jsonl"
    shutil.copy(FIX / "mtl5_jsonl" / "agnews" / "train.jsonl", p)
    n = sum(1 for _ in open(p))
    with open(p, "a") as f:
        f.write(line)
    with pytest.raises(DataFormatError, match=rf"train\.jsonl:{n + 1}: .*{msg}"):
        read_jsonl(p, MTL5_LABELS["agnews"])


def test_malformed_file_surfaces_through_load_mtl5(tmp_path):
    shutil.copytree(FIX / "mtl5_csv", tmp_path / "m")
    with open(tmp_path / "m" / "dbpedia_csv" / "test.csv", "a") as f:
        f.write('"15","t","x"\n')
    with pytest.raises(DataFormatError, match=r"dbpedia_csv/test\.csv:\d+"):
        load_mtl5(tmp_path / "m", order=1)


def test_order_errors():
    assert resolve_order("yahoo, agnews") == ["yahoo", "agnews"]
    with pytest.raises(ValueError, match="preset 4"):
        resolve_order(4)
    with pytest.raises(ValueError, match="unknown dataset"):
        resolve_order(["agnews", "imdb"])
    with pytest.raises(FileNotFoundError, match="yelp"):
        load_mtl5(FIX / "mtl5_csv", order=["yelp"])
    with pytest.raises(ValueError, match="no train examples"):
        load_mtl5(FIX / "mtl5_csv", order=["agnews"], dev_per_class=50)


def test_synthetic_tasks_conflict_and_are_deterministic():
    a = synthetic_tasks(num_tasks=3, train_size=50, dev_size=10, test_size=40, seed=5)
    b = synthetic_tasks(num_tasks=3, train_size=50, dev_size=10, test_size=40, seed=5)
    assert [t.train for t in a] == [t.train for t in b]
    assert len({t.instruction for t in a}) == 3 and all(t.label_names == a[0].label_names for t in a)
    for t in a:
        labels = Counter(e.label for e in t.train)
        assert min(labels.values()) >= 10  # both classes present
    # the same input gets different labels under different tasks' rules (conflict), for many inputs
    words = synthetic_vocabulary(16, 3, 2)[:16]
    rules = []
    for t in a:  # recover each task's word -> class map from its single-word evidence
        votes = {w: Counter() for w in words}
        for e in t.train + t.test:
            for w in e.text.split():
                votes[w][e.label] += 1
        rules.append({w: v.most_common(1)[0][0] for w, v in votes.items()})
    assert sum(rules[0][w] != rules[1][w] for w in words) >= 4


def test_builtin_tokenizer_round_trip():
    tok = BuiltinTokenizer(["task", "alpha", "apple"])
    text = "task alpha apple Grüße, 42!"
    ids = tok.encode(text)
    assert ids[:3] == [len(tok) - 3, len(tok) - 2, len(tok) - 1]
    assert tok.decode(ids) == text
    assert tok.encode(text, add_special_tokens=True)[0] == tok.bos_token_id
    with pytest.raises(ValueError, match="whitespace"):
        BuiltinTokenizer(["two words"])

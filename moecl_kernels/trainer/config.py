"""Run configuration: nested dataclasses, loaded from YAML/JSON, with ``key=value`` overrides.

Every field has a default; the defaults are the offline demo (the synthetic benchmark,
a tiny random-init Llama, MoE-CL vs sequential LoRA). A config file only names what it
changes; unknown keys are errors (they name the key and the allowed ones).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import yaml

METHODS = ("moecl", "moecl_nogan", "seq_lora", "isolated_lora", "olora")


class ConfigError(ValueError):
    """A bad config key or value; the message names it."""


@dataclass
class ModelConfig:
    # a built-in tiny config ("tiny-llama", "tiny-bert") or a local Hugging Face model directory
    name_or_path: str = "tiny-llama"
    tokenizer: Optional[str] = None  # default: the model directory; "builtin" for the built-in tokenizer
    dtype: str = "float32"  # float32 | bfloat16 | float16 (LoRA math accumulates in fp32)
    target_modules: Any = None  # None = the FFN projections (gate/up/down_proj or BERT intermediate/output)
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    backend: Optional[str] = None  # None = $MOECL_BACKEND / auto


@dataclass
class SyntheticConfig:
    num_tasks: int = 4
    num_classes: int = 2
    num_words: int = 16  # content vocabulary
    length: int = 8  # content words per input (inputs with a tied majority are redrawn)
    train_size: int = 400
    dev_size: int = 100
    test_size: int = 200
    seed: int = 1234  # the rules and examples; independent of the training seed


@dataclass
class DataConfig:
    benchmark: str = "synthetic"  # synthetic | mtl5 | folder (your tasks) | realtext (generated offline)
    root: Optional[str] = None  # mtl5: one folder per dataset; folder: one folder per task; realtext: where to generate
    layout: str = "auto"  # MTL5: auto | csv | jsonl
    order: Any = None  # mtl5: preset 1 (default), 2, 3 or dataset names; folder: task names (default: sorted)
    text_key: str = "text"  # folder: the text field of a JSONL line ("sentence" is accepted for "text")
    label_key: str = "label"  # folder: the label field
    realtext_seed: int = 0  # realtext: which sentences go to train/dev/test
    train_per_class: Optional[int] = 1000  # None = all
    dev_per_class: Optional[int] = 50  # taken from dev files, else held out of train
    test_per_class: Optional[int] = 500  # None = all
    max_length: int = 256
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)


@dataclass
class TrainConfig:
    mode: str = "classification"  # classification (per-task heads) | generative (LM loss, exact match)
    epochs: int = 3
    batch_size: int = 32  # global batch (split over processes)
    eval_batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_ratio: float = 0.0
    scheduler: str = "constant"  # constant | linear
    grad_clip: Optional[float] = 1.0
    max_steps_per_task: Optional[int] = None  # cap (tests, smoke runs)
    keep_best: bool = True  # keep the best-on-dev checkpoint of each task (dev checked every epoch)
    checkpoint_every: int = 50  # steps; 0 = only after each task


@dataclass
class MethodConfig:
    lambda_adv: float = 1.0  # MoE-CL: weight of the adversarial (discriminator) loss
    adv_cap: bool = True  # the shared expert ascends L_D only up to chance level, log(num_tasks)
    disc_modules: Optional[list] = None  # injected-module name suffixes with a discriminator; None = all
    olora_lambda: float = 0.5  # O-LoRA: weight of the orthogonality loss


@dataclass
class RunConfig:
    name: str = "demo"
    output_dir: str = "runs"  # results go to output_dir/name
    seed: int = 0
    methods: list = field(default_factory=lambda: ["moecl", "seq_lora"])
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    method: MethodConfig = field(default_factory=MethodConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def fingerprint(self, exclude: Sequence[str] = ("methods", "output_dir", "name")) -> str:
        """Hash of everything that changes the numbers (checkpoints of another config are refused)."""
        d = {k: v for k, v in self.to_dict().items() if k not in exclude}
        return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _build(cls, data: dict, where: str):
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'} must be a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else key
        if key not in fields:
            raise ConfigError(f"unknown config key {path!r}; allowed: {sorted(fields)}")
        default = fields[key].default_factory() if fields[key].default_factory is not dataclasses.MISSING else fields[key].default
        kwargs[key] = _build(type(default), value, path) if dataclasses.is_dataclass(default) else _coerce(value, default, path)
    return cls(**kwargs)


def _coerce(value: Any, default: Any, path: str) -> Any:
    """Numbers given as strings (YAML reads ``3e-4`` as a string) become the default's type."""
    if isinstance(default, bool) or value is None or default is None:
        return value
    if isinstance(default, (int, float)) and not isinstance(value, bool):
        try:
            return type(default)(value) if isinstance(value, str) or isinstance(default, float) else value
        except ValueError as e:
            raise ConfigError(f"{path} must be a number, got {value!r}") from e
    return value


def _check(cfg: RunConfig) -> RunConfig:
    def need(cond: bool, msg: str) -> None:
        if not cond:
            raise ConfigError(msg)

    if isinstance(cfg.methods, str):
        cfg.methods = [m.strip() for m in cfg.methods.split(",") if m.strip()]
    need(len(cfg.methods) > 0, "methods is empty; choose from " + ", ".join(METHODS))
    for m in cfg.methods:
        need(m in METHODS, f"methods: unknown method {m!r}; choose from {', '.join(METHODS)}")
    need(len(set(cfg.methods)) == len(cfg.methods), f"methods lists a method twice: {cfg.methods}")
    need(cfg.train.mode in ("classification", "generative"), f"train.mode must be classification or generative, got {cfg.train.mode!r}")
    need(cfg.train.scheduler in ("constant", "linear"), f"train.scheduler must be constant or linear, got {cfg.train.scheduler!r}")
    need(cfg.data.benchmark in ("synthetic", "mtl5", "folder", "realtext"), f"data.benchmark must be synthetic, mtl5, folder or realtext, got {cfg.data.benchmark!r}")
    need(cfg.data.layout in ("auto", "csv", "jsonl"), f"data.layout must be auto, csv or jsonl, got {cfg.data.layout!r}")
    need(cfg.data.benchmark not in ("mtl5", "folder") or cfg.data.root is not None, f"data.root is required for data.benchmark={cfg.data.benchmark}")
    need(cfg.model.dtype in ("float32", "bfloat16", "float16"), f"model.dtype must be float32, bfloat16 or float16, got {cfg.model.dtype!r}")
    for name in ("epochs", "batch_size", "eval_batch_size"):
        need(int(getattr(cfg.train, name)) >= 1, f"train.{name} must be >= 1")
    need(cfg.train.checkpoint_every >= 0, "train.checkpoint_every must be >= 0")
    need(cfg.method.lambda_adv >= 0, "method.lambda_adv must be >= 0")
    need(cfg.method.olora_lambda >= 0, "method.olora_lambda must be >= 0")
    s = cfg.data.synthetic
    need(s.num_tasks >= 1 and s.num_classes >= 2, "data.synthetic needs num_tasks >= 1 and num_classes >= 2")
    need(s.num_words >= s.num_classes, "data.synthetic.num_words must be >= num_classes")
    need(s.length >= 1, "data.synthetic.length must be >= 1")
    return cfg


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b.c=value`` -> (["a", "b", "c"], value parsed as YAML: numbers, bools, null, lists)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key.subkey=value")
    key, _, raw = text.partition("=")
    keys = [k for k in key.strip().split(".") if k]
    if not keys:
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({e})") from e
    return keys, value


def load_config(path: Union[str, Path, None] = None, overrides: Sequence[str] = ()) -> RunConfig:
    """The config of ``path`` (YAML or JSON; None = defaults) with ``overrides`` applied."""
    data: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} does not exist")
        text = p.read_text()
        try:
            data = json.loads(text) if p.suffix == ".json" else (yaml.safe_load(text) or {})
        except (ValueError, yaml.YAMLError) as e:
            raise ConfigError(f"{p}: not valid {'JSON' if p.suffix == '.json' else 'YAML'}: {e}") from e
        if not isinstance(data, dict):
            raise ConfigError(f"{p}: the top level must be a mapping")
    for text in overrides:
        keys, value = parse_override(text)
        node = data
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {text!r}: {k!r} is not a section")
        node[keys[-1]] = value
    return _check(_build(RunConfig, data, ""))

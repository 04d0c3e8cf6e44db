"""Run configuration: nested dataclasses, loaded from YAML/JSON, with ``key=value`` overrides.

Every field has a default; the defaults are the offline demo (the synthetic benchmark,
a tiny random-init Llama; MoE-CL with per-task snapshots and no GAN term, MoE-CL, isolated LoRA at rank r and
at the rank-matched 2r, sequential LoRA). A config file only names what it changes; unknown keys are errors (they name the key and the allowed ones).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import yaml

from .methods import METHODS


class ConfigError(ValueError):
    """A bad config key or value; the message (one line) names it."""


def _f(default: Any, lo: Any = None, hi: Any = None, *, gt: bool = False, lt: bool = False,
       choices: Optional[Sequence[str]] = None) -> Any:
    """A field with its allowed range (``lo <= v <= hi``; ``gt``/``lt`` make a bound strict)
    or its allowed ``choices``; types come from the annotation."""
    meta = {"lo": lo, "hi": hi, "gt": gt, "lt": lt, "choices": tuple(choices) if choices else None}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class ModelConfig:
    # a built-in tiny model ("tiny-llama", "tiny-bert"), a packaged one ("minilm": the [realmodel] extra)
    # or a local Hugging Face model directory; nothing is downloaded
    name_or_path: str = "tiny-llama"
    tokenizer: Optional[str] = None  # default: the model's; "builtin" for the built-in tokenizer
    dtype: str = _f("float32", choices=("float32", "bfloat16", "float16"))  # LoRA math accumulates in fp32
    # ffn: each expert is a whole MLP, mixed once per MLP (the paper's, docs/spec.md §1.3); linear: each
    # projection mixes its own experts (§1.1)
    level: str = _f("ffn", choices=("ffn", "linear"))
    target_modules: Any = None  # None = every MLP (ffn) / the FFN projections (linear: gate/up/down_proj, BERT dense)
    r: int = _f(8, 1, 128)  # the rank limit of docs/spec.md §1.4
    alpha: float = _f(16.0, 0, gt=True)
    dropout: float = _f(0.05, 0.0, 1.0, lt=True)
    backend: Optional[str] = None  # None = $MOECL_BACKEND / auto


@dataclass
class SyntheticConfig:
    num_tasks: int = _f(4, 1, 16)
    num_classes: int = _f(2, 2, 8)
    num_words: int = _f(16, 2, 32)  # content vocabulary
    length: int = _f(8, 1)  # content words per input (inputs with a tied majority are redrawn)
    train_size: int = _f(400, 1)
    dev_size: int = _f(100, 1)
    test_size: int = _f(200, 1)
    seed: int = 1234  # the rules and examples; independent of the training seed


BENCHMARKS = ("synthetic", "mtl5", "folder", "realtext")


@dataclass
class DataConfig:
    benchmark: str = _f("synthetic", choices=BENCHMARKS)  # folder: your tasks; realtext: generated offline
    root: Optional[str] = None  # mtl5: one folder per dataset; folder: one folder per task; realtext: where to generate
    layout: str = _f("auto", choices=("auto", "csv", "jsonl"))  # MTL5 files
    order: Any = None  # mtl5: preset 1 (default), 2, 3 or dataset names; folder: task names (default: sorted)
    text_key: str = "text"  # folder: the text field of a JSONL line ("sentence" is accepted for "text")
    label_key: str = "label"  # folder: the label field
    realtext_seed: int = _f(0, 0)  # realtext: which sentences go to train/dev/test
    train_per_class: Optional[int] = _f(1000, 1)  # None = all
    dev_per_class: Optional[int] = _f(50, 1)  # taken from dev files, else held out of train
    test_per_class: Optional[int] = _f(500, 1)  # None = all
    max_length: int = _f(256, 4)
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)


@dataclass
class TrainConfig:
    mode: str = _f("classification", choices=("classification", "generative"))  # per-task heads | LM loss, exact match
    epochs: int = _f(3, 1)
    batch_size: int = _f(32, 1)  # global batch (split over processes)
    eval_batch_size: int = _f(128, 1)
    lr: float = _f(1e-3, 0, gt=True)
    weight_decay: float = _f(0.01, 0)
    warmup_ratio: float = _f(0.0, 0, 1)
    scheduler: str = _f("constant", choices=("constant", "linear"))
    grad_clip: Optional[float] = _f(1.0, 0, gt=True)
    max_steps_per_task: Optional[int] = _f(None, 1)  # cap (tests, smoke runs)
    keep_best: bool = True  # keep the best-on-dev checkpoint of each task (dev checked every epoch)
    checkpoint_every: int = _f(50, 0)  # steps; 0 = only after each task
    group_by_length: bool = False  # batches of similar lengths (less padding; real text); off = plain shuffle
    # classification: FWT from linear probes (a task's head fitted on the frozen backbone before the task,
    # vs on the untrained backbone); off: FWT from the accuracy matrix (a task's untrained head)
    fwt_probe: bool = True
    # classification: how a task's head starts: random (nn.Linear init) | probe (LP-FT: the linear probe
    # fitted on the task's training features of the backbone as it stands before the task, probe.py)
    head_init: str = _f("random", choices=("random", "probe"))
    # processes: ddp (replicated model) | fsdp (FSDP2: frozen backbone sharded, adapters replicated);
    # auto = fsdp under `accelerate launch --use_fsdp`, else ddp
    parallel: str = _f("auto", choices=("auto", "ddp", "fsdp"))


@dataclass
class MethodConfig:
    lambda_adv: float = _f(1.0, 0)  # MoE-CL: weight of the adversarial (discriminator) loss
    adv_cap: bool = True  # the shared expert ascends L_D only up to chance level, log(num_tasks)
    # L_D's cross-entropy over the discriminator's logits, or over its softmax probabilities (the official
    # MoE-CL code's: bounded, with a damped gradient)
    adv_loss: str = _f("logits", choices=("logits", "probs"))
    disc_modules: Optional[list] = None  # injected-module name suffixes with a discriminator; None = all
    olora_lambda: float = _f(0.5, 0)  # O-LoRA: weight of the orthogonality loss
    # the moecl_* variants (methods.py)
    memory_per_task: int = _f(32, 1)  # moecl_dmem: pooled inputs kept per finished task
    distill_lambda: float = _f(1.0, 0)  # moecl_distill: weight of the shared path's relative drift
    shared_lr_scale: float = _f(0.1, 0, gt=True)  # moecl_slr: the shared expert's lr factor from task 2 on


@dataclass
class RunConfig:
    name: str = "demo"
    output_dir: str = "runs"  # results go to output_dir/name
    seed: int = _f(0, 0)
    # a list, a comma string, or "all"
    methods: list = _f(["moecl_snap_nogan", "moecl", "isolated_lora", "isolated_lora_rm", "seq_lora"])
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    method: MethodConfig = field(default_factory=MethodConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def fingerprinted(self, exclude: Sequence[str] = ("methods", "output_dir", "name")) -> dict:
        """Everything that changes the numbers (what :meth:`fingerprint` hashes)."""
        d = {k: v for k, v in self.to_dict().items() if k not in exclude}
        d["train"] = {k: v for k, v in d["train"].items() if k != "parallel"}
        if d["method"].get("adv_loss") == "logits":  # the default, added later: earlier checkpoints still resume
            d["method"] = {k: v for k, v in d["method"].items() if k != "adv_loss"}
        return d

    def fingerprint(self, exclude: Sequence[str] = ("methods", "output_dir", "name")) -> str:
        """Hash of everything that changes the numbers (checkpoints of another config are refused)."""
        return hashlib.sha256(json.dumps(self.fingerprinted(exclude), sort_keys=True, default=str).encode()).hexdigest()[:16]


# ------------------------------------------------------------------------------ validation

def _describe(kind: str, meta: dict) -> str:
    if meta.get("choices"):
        return "one of " + ", ".join(meta["choices"])
    lo, hi = meta.get("lo"), meta.get("hi")
    if lo is not None and hi is not None:
        return f"{kind} in {'(' if meta['gt'] else '['}{lo}, {hi}{')' if meta['lt'] else ']'}"
    if lo is not None:
        return f"{kind} {'>' if meta['gt'] else '>='} {lo}"
    if hi is not None:
        return f"{kind} {'<' if meta['lt'] else '<='} {hi}"
    return kind


def _typed(value: Any, hint: Any, meta: dict, path: str) -> Any:
    """``value`` checked against the annotation ``hint`` and the field's range/choices."""
    if typing.get_origin(hint) is Union:
        if value is None:
            return None
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    kind = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(hint)
    if kind is None:  # Any / list: checked in _check
        return value
    bad = ConfigError(f"{path} must be {_describe(kind, meta)}, got {value!r}")
    if hint is bool:
        if not isinstance(value, bool):
            raise bad
        return value
    if isinstance(value, str) and hint in (int, float):  # YAML reads 3e-4 as a string
        try:
            value = int(value.strip()) if hint is int else float(value)
        except ValueError:
            raise bad from None
    if hint is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise bad
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise bad
        value = float(value)
    if hint is str and not isinstance(value, str):
        raise bad
    lo, hi = meta.get("lo"), meta.get("hi")
    if (meta.get("choices") and value not in meta["choices"]) \
            or (lo is not None and (value <= lo if meta["gt"] else value < lo)) \
            or (hi is not None and (value >= hi if meta["lt"] else value > hi)):
        raise bad
    return value


def _build(cls, data: Any, where: str):
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'} must be a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else key
        if key not in fields:
            raise ConfigError(f"unknown config key {path!r}; allowed: {sorted(fields)}")
        f = fields[key]
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        kwargs[key] = _build(type(default), value, path) if dataclasses.is_dataclass(default) \
            else _typed(value, hints[key], dict(f.metadata), path)
    for key, f in fields.items():  # defaults pass the same checks (a field's default within its range)
        if key not in kwargs and f.default is not dataclasses.MISSING:
            _typed(f.default, hints[key], dict(f.metadata), f"{where}.{key}" if where else key)
    return cls(**kwargs)


def _names(value: Any, path: str, allow_none: bool = True) -> Optional[list[str]]:
    """None, a non-empty list of non-empty strings, or a comma-separated string of them."""
    if value is None and allow_none:
        return None
    if isinstance(value, str):
        value = [v.strip() for v in value.split(",") if v.strip()]
    if not isinstance(value, list) or not value or not all(isinstance(v, str) and v.strip() for v in value):
        raise ConfigError(f"{path} must be a non-empty list (or comma-separated string) of names, got {value!r}")
    return list(value)


def _check(cfg: RunConfig) -> RunConfig:
    def need(cond: bool, msg: str) -> None:
        if not cond:
            raise ConfigError(msg)

    names = tuple(METHODS)
    if cfg.methods == "all" or cfg.methods == ["all"]:  # every method the model's level can run
        cfg.methods = [n for n in names if cfg.model.level == "linear" or not METHODS[n].linear_only]
    cfg.methods = _names(cfg.methods, "methods", allow_none=False)
    for m in cfg.methods:
        need(m in names, f"methods: unknown method {m!r}; choose from {', '.join(names)} (or all)")
        need(cfg.model.level == "linear" or not METHODS[m].linear_only,
             f"methods: {m} needs model.level=linear (it recomputes the shared path from pooled inputs, "
             f"which the FFN level's shared MLP does not allow); model.level={cfg.model.level}")
    need(len(set(cfg.methods)) == len(cfg.methods), f"methods lists a method twice: {cfg.methods}")
    need(cfg.name.strip() != "" and cfg.output_dir.strip() != "", "name and output_dir must be non-empty")
    d, m = cfg.data, cfg.model
    if d.order is not None and not (isinstance(d.order, int) and not isinstance(d.order, bool)):
        d.order = _names(d.order, "data.order")
    need(not isinstance(d.order, int) or d.benchmark == "mtl5",
         f"data.order={d.order} is an MTL5 preset; data.benchmark={d.benchmark} takes task names")
    if d.benchmark in ("mtl5", "folder"):
        need(d.root is not None, f"data.root is required for data.benchmark={d.benchmark}")
        need(Path(d.root).is_dir(), f"data.root: directory {d.root!r} does not exist")
        if d.benchmark == "folder":
            from .folder import resolve_folder_order

            try:
                resolve_folder_order(d.root, d.order)
            except ValueError as e:
                raise ConfigError(str(e)) from None
    need(cfg.train.head_init == "random" or cfg.train.mode == "classification",
         f"train.head_init=probe needs train.mode=classification (a generative run has no heads); "
         f"train.mode={cfg.train.mode}")
    need(d.text_key.strip() != "" and d.label_key.strip() != "", "data.text_key and data.label_key must be non-empty")
    s = d.synthetic
    need(s.num_words >= s.num_classes, f"data.synthetic.num_words ({s.num_words}) must be >= num_classes ({s.num_classes})")
    if m.target_modules is not None and not isinstance(m.target_modules, str):
        m.target_modules = _names(m.target_modules, "model.target_modules")
    cfg.method.disc_modules = _names(cfg.method.disc_modules, "method.disc_modules")
    if m.backend is not None:
        from moecl_kernels.backends import registered_backends

        known = ["auto", *registered_backends()]
        need(m.backend in known, f"model.backend must be one of {', '.join(known)} (or null), got {m.backend!r}")
        why = _backend_problem(m.backend) if m.backend != "auto" else None
        need(why is None, f"model.backend={m.backend} cannot run on this machine: {why}")
    from .model import ModelNotFound, is_encoder_name, local_model_problem, resolve_model_path

    for key, value in (("model.name_or_path", m.name_or_path), ("model.tokenizer", m.tokenizer)):
        if value is not None and value != "builtin":
            try:
                resolve_model_path(value)
            except ModelNotFound as e:
                raise ConfigError(str(e).replace("model.name_or_path", key)) from None
    problem = local_model_problem(m.name_or_path, m.tokenizer)
    need(problem is None, problem or "")
    need(not (cfg.train.mode == "generative" and is_encoder_name(m.name_or_path)),
         f"train.mode=generative needs a causal LM; model.name_or_path={m.name_or_path} is an encoder")
    return cfg


def _backend_problem(name: str) -> Optional[str]:
    """Why backend ``name`` cannot run on the device the trainer will use (None if it can)."""
    import torch

    from moecl_kernels.backends import get_backend, load_error

    be = get_backend(name)
    probe = torch.empty(1, device="cuda" if torch.cuda.is_available() else "cpu")
    return load_error(name) if be is None else be.unavailable_reason(probe)


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


def config_from_dict(data: dict) -> RunConfig:
    """The checked config of a mapping (``RunConfig.to_dict``'s output: a report's or an export's)."""
    return _check(_build(RunConfig, data, ""))


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
    return config_from_dict(data)

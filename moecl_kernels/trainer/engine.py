"""The continual-training loop: for each method, for each task k in order: train
``set_trainable(task=k)`` parameters (keeping the best-on-dev state), then test every
task to fill row k of the accuracy matrix R; finally ACC/BWT/FWT and the reports.

Determinism and resume: the data order of (task, epoch) comes from a generator seeded
by (seed, task, epoch); every other random draw (init, LoRA dropout seeds) comes from
the torch RNG, whose state is checkpointed. A checkpoint holds the trainable
parameters, the optimizer and scheduler, the best-on-dev snapshot, the position
(task, epoch, step) and the results so far, so a resumed run replays exactly the
steps an uninterrupted one takes.

Data parallel: each global batch is split over the processes (``indices[rank::world]``);
per-example losses are summed and scaled by world / global batch, so gradient
averaging gives the global-batch mean and the numbers match a single-process run with
the same ``train.batch_size`` (up to float reduction order and LoRA dropout masks,
which depend on each process's token layout).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

import moecl_kernels as mk

from .batching import Encoded, Encoder, collate, collate_prompts
from .checkpoint import (CHECKPOINT_NAME, load_checkpoint, refuse_overwrite, rng_state, save_checkpoint, seed_everything,
                         set_rng_state)
from .config import RunConfig
from .data import DataFormatError, TaskData, load_mtl5, synthetic_tasks, synthetic_vocabulary, tasks_digest
from .distributed import DistInfo, all_reduce_sum, barrier, init_distributed, shutdown
from .folder import load_folder
from .export import write_export
from .methods import METHODS, MethodSpec, merge_expert
from .metrics import add_transfer_gain, cl_metrics
from .model import (ContinualModel, adapter_parameters, build_backbone, build_tokenizer, default_target_modules,
                    is_encoder, is_encoder_name)
from .parallel import average_gradients, parallel_kind, shard_backbone
from .probe import fit_probe, probe_accuracy_of, probe_head
from .report import machine_info, write_comparison, write_method_report
from .variants import adapter_group, warm_start_task_expert

log = logging.getLogger("moecl_kernels.trainer")


@dataclass
class Prepared:
    """Tasks and their token ids, shared by every method of a run."""

    tasks: list[TaskData]
    tokenizer: Any
    encoder: Encoder
    train: list[list[Encoded]]
    dev: list[list[Encoded]]
    test: list[list[Encoded]]
    digest: str = ""  # SHA-256 of the tasks' examples (reports; checkpoints of other data are refused)


def realtext_root(cfg: RunConfig) -> Path:
    """Where ``data.benchmark=realtext`` keeps the generated benchmark: ``data.root`` or
    ``<output_dir>/realtext-<data.realtext_seed>`` (shared by the runs of one output_dir)."""
    return Path(cfg.data.root) if cfg.data.root else Path(cfg.output_dir) / f"realtext-{cfg.data.realtext_seed}"


def load_tasks(cfg: RunConfig, info: Optional[DistInfo] = None) -> list[TaskData]:
    d = cfg.data
    per_class = dict(train_per_class=d.train_per_class, dev_per_class=d.dev_per_class, test_per_class=d.test_per_class,
                     seed=cfg.seed)
    if d.benchmark == "synthetic":
        return synthetic_tasks(**dataclasses.asdict(d.synthetic))
    if d.benchmark == "mtl5":
        return load_mtl5(d.root, 1 if d.order is None else d.order, d.layout, **per_class)
    root = d.root
    if d.benchmark == "realtext":
        from . import realtext  # imported here: `python -m moecl_kernels.trainer.realtext` runs it as __main__

        root = realtext_root(cfg)
        if info is None or info.is_main:
            realtext.ensure(root, seed=d.realtext_seed)
        if info is not None:
            barrier(info)
    return load_folder(root, d.order, d.text_key, d.label_key, **per_class)


def prepare(cfg: RunConfig, info: Optional[DistInfo] = None) -> Prepared:
    d = cfg.data
    tasks = load_tasks(cfg, info)
    words = []
    if d.benchmark == "synthetic":
        s = d.synthetic
        words = synthetic_vocabulary(s.num_words, s.num_tasks, s.num_classes)
    if cfg.train.mode == "classification":
        for t in tasks:
            if t.is_instruction:
                raise DataFormatError(f"task {t.name!r} holds instruction data ({{input, output}}): it needs "
                                      "train.mode=generative")
    tok = build_tokenizer(cfg.model.name_or_path, cfg.model.tokenizer, words)
    enc = Encoder(tok, cfg.train.mode, is_encoder_name(cfg.model.name_or_path), d.max_length)

    def encode(split: str) -> list[list[Encoded]]:
        return [[enc.encode(t, k, e) for e in getattr(t, split)] for k, t in enumerate(tasks)]

    for t in tasks:
        for split in ("train", "dev", "test"):
            if not getattr(t, split):
                raise ValueError(f"task {t.name!r} has no {split} examples")
    return Prepared(tasks, tok, enc, encode("train"), encode("dev"), encode("test"), tasks_digest(tasks))


def build_model(cfg: RunConfig, spec: MethodSpec, prep: Prepared, device: torch.device) -> ContinualModel:
    m = cfg.model
    tok = prep.tokenizer
    special = {"pad_token_id": getattr(tok, "pad_token_id", None), "bos_token_id": getattr(tok, "bos_token_id", None),
               "eos_token_id": getattr(tok, "eos_token_id", None)}
    backbone = build_backbone(m.name_or_path, cfg.train.mode == "generative", len(tok), cfg.data.max_length, m.dtype, special)
    targets = m.target_modules if m.target_modules or m.level == "ffn" else default_target_modules(backbone)
    num_tasks = len(prep.tasks)
    mk.inject(backbone, target_modules=targets, num_tasks=spec.num_experts(num_tasks), r=m.r * spec.rank_scale,
              alpha=m.alpha * spec.rank_scale,
              dropout=m.dropout, gate=spec.gate, backend=m.backend, level=m.level)
    model = ContinualModel(
        backbone, spec, [t.num_classes for t in prep.tasks], cfg.train.mode,
        pooling="first" if is_encoder(backbone) else "last", lambda_adv=cfg.method.lambda_adv,
        adv_cap=cfg.method.adv_cap, disc_modules=cfg.method.disc_modules, olora_lambda=cfg.method.olora_lambda,
        distill_lambda=cfg.method.distill_lambda, adv_probs=cfg.method.adv_loss == "probs",
    )
    return model.to(device)


def _to(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def evaluate(model: ContinualModel, items: list[Encoded], phase: str, cfg: RunConfig, prep: Prepared,
             info: DistInfo, synced: bool = False) -> float:
    """Accuracy (classification) or exact match (generative) over ``items``, sharded over
    processes; batches of similar lengths (the order does not change the score). Every
    process runs the same number of batches (FSDP all-gathers are collective): a process
    with fewer items repeats one and does not count it."""
    model.eval()
    shard = sorted(items[info.rank::info.world_size], key=lambda e: len(e.input_ids))
    bs = cfg.train.eval_batch_size
    n_batches = -(-((len(items) + info.world_size - 1) // info.world_size) // bs)
    correct = 0
    enc = prep.encoder
    for b in range(n_batches):
        chunk, real = shard[b * bs:(b + 1) * bs], True
        if not chunk:  # this process ran out: a dummy batch keeps the collectives in step
            chunk, real = items[:1], False
        if cfg.train.mode == "classification":
            c = model.count_correct(_to(collate(chunk, enc.pad_id, "classification"), info.device), phase)
        else:
            prompts, answers = collate_prompts(chunk, enc.pad_id)
            c = model.count_exact_match(_to(prompts, info.device), answers, phase, enc.pad_id, enc.eos_id,
                                        synced=synced)
        correct += c if real else 0
    totals = all_reduce_sum(torch.tensor([float(correct), float(len(shard))], device=info.device), info)
    return float(totals[0] / totals[1])


def _epoch_batches(lengths: list[int], batch_size: int, seed: int, task: int, epoch: int, world: int,
                   group_by_length: bool = False) -> list[list[int]]:
    """The batches (example indices) of one epoch, from a generator seeded by (seed, task,
    epoch). ``group_by_length``: the shuffled order is cut into windows of 50 batches, each
    sorted by length and cut into batches, and the batches are shuffled (less padding)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + task * 1_009 + epoch)
    order = torch.randperm(len(lengths), generator=g).tolist()
    if group_by_length:
        window = 50 * batch_size
        order = [i for w in range(0, len(order), window) for i in sorted(order[w:w + window], key=lambda i: lengths[i])]
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    if group_by_length:
        batches = [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]
    return [b for b in batches if len(b) >= world]  # every process needs at least one example


def _lr_lambda(kind: str, total: int, warmup: int):
    def f(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if kind == "linear":
            return max(0.0, (total - step) / max(1, total - warmup))
        return 1.0

    return f


def _fresh_task_state() -> dict[str, Any]:
    return {"epoch": 0, "step": 0, "task_step": 0, "last_eval": -1, "best": None, "best_score": None,
            "optimizer": None, "scheduler": None, "dev_history": [], "drift_ref": None}


class MethodRun:
    """One method's continual run over the task sequence (resumable)."""

    def __init__(self, cfg: RunConfig, name: str, prep: Prepared, info: DistInfo) -> None:
        self.cfg, self.name, self.prep, self.info = cfg, name, prep, info
        self.spec = METHODS[name]
        self.out_dir = cfg.run_dir / name
        self.ckpt_path = self.out_dir / CHECKPOINT_NAME
        self.fingerprint = f"{cfg.fingerprint()}:{prep.digest[:16]}:{name}"
        self.global_step = 0
        self.state: dict[str, Any] = {}
        self.model: Optional[ContinualModel] = None
        self.kind = parallel_kind(cfg.train.parallel, info)  # single | ddp | fsdp
        self._fitted: dict[int, tuple] = {}  # task -> probe fitted on the backbone as it stands now

    # ------------------------------------------------------------------ checkpoints
    def _save(self, elapsed: float) -> None:
        if self.info.is_main:
            payload = {
                "fingerprint": self.fingerprint, "config": self.cfg.fingerprinted(), "method": self.name,
                "global_step": self.global_step,
                "elapsed": elapsed, "state": self.state, "rng": rng_state(),
                "model": {k: v.detach().cpu() for k, v in self.model.adapter_state().items()},
            }
            save_checkpoint(self.ckpt_path, payload)
        barrier(self.info)

    def _restore(self, ckpt: dict[str, Any]) -> float:
        self.model.load_adapter_state(ckpt["model"])
        self.state = ckpt["state"]
        self.global_step = ckpt["global_step"]
        if self.spec.olora:  # earlier tasks' LoRAs were merged into the base weights
            for j in range(self.state["task"]):
                merge_expert(self.model.backbone, j)
        set_rng_state(ckpt["rng"])
        log.info("%s: resumed at task %d, epoch %d, step %d", self.name, self.state["task"] + 1,
                 self.state["epoch"] + 1, self.state["step"])
        return float(ckpt["elapsed"])

    # ------------------------------------------------------------------ main
    def run(self, resume: bool) -> dict[str, Any]:
        cfg, info = self.cfg, self.info
        report = self.out_dir / "report.json"
        if resume and report.is_file():
            done = json.loads(report.read_text())
            if done.get("fingerprint") == self.fingerprint:
                log.info("%s: already finished (%s)", self.name, report)
                return done
        ckpt = load_checkpoint(self.ckpt_path, self.fingerprint, self.cfg.fingerprinted()) if resume else None
        seed_everything(cfg.seed)
        self.model = build_model(cfg, self.spec, self.prep, info.device)
        if self.kind == "fsdp":
            n = shard_backbone(self.model.backbone, adapter_parameters(self.model.backbone), info)
            log.info("%s: FSDP2 over %d processes (%d blocks sharded; adapters replicated)", self.name,
                     info.world_size, n)
        self.state = {"task": 0, "R": [], "baseline": None, "probe": {}, "probe_base": None, **_fresh_task_state()}
        elapsed = self._restore(ckpt) if ckpt is not None else 0.0
        self.model.bind(self.state)
        t0 = time.perf_counter() - elapsed
        tests = self.prep.test
        probing = cfg.train.fwt_probe and cfg.train.mode == "classification"
        if self.state["baseline"] is None:
            self.state["baseline"] = [self._evaluate(tests[j], "test", j) for j in range(len(tests))]
        if probing and self.state["probe_base"] is None:
            self.state["probe_base"] = [self._probe(j) for j in range(len(tests))]
        for k in range(self.state["task"], len(self.prep.tasks)):
            if probing and k > 0 and k not in self.state["probe"]:
                self.state["probe"][k] = self._probe(k)
            self._train_task(k, t0)
            self._fitted.clear()  # the backbone has changed
            row = [self._evaluate(tests[j], "test", j) for j in range(len(tests))]
            self.state["R"].append(row)
            log.info("%s: after task %d (%s): test accuracy %s", self.name, k + 1, self.prep.tasks[k].name,
                     " ".join(f"{100 * a:.1f}" for a in row))
            self.state.update(task=k + 1, **_fresh_task_state())
            self._save(time.perf_counter() - t0)
        result = self._result(time.perf_counter() - t0)
        if info.is_main:
            write_method_report(self.out_dir, result)
            write_export(self.out_dir, cfg, self.name, self.model, self.prep, result["R"][-1])  # adapter/ + heads
        barrier(info)
        return result

    def _result(self, wall: float) -> dict[str, Any]:
        cfg = self.cfg
        R, b, st = self.state["R"], self.state["baseline"], self.state
        probe = None
        if st["probe_base"] is not None:
            probe = [st["probe"].get(i) for i in range(len(R))]
        return {
            "method": self.name, "benchmark": cfg.data.benchmark, "mode": cfg.train.mode, "level": cfg.model.level,
            "seed": cfg.seed,
            "tasks": [t.name for t in self.prep.tasks], "data_sha256": self.prep.digest, "R": R, "baseline": b,
            "probe": probe, "probe_baseline": st["probe_base"],
            "metrics": cl_metrics(R, b, probe, st["probe_base"]), "wall_time_s": wall, "parallel": self.kind,
            "machine": machine_info(self.info.world_size), "fingerprint": self.fingerprint,
            "config": cfg.to_dict(),
        }

    def _train_task(self, k: int, t0: float) -> None:
        cfg, info, st, model = self.cfg, self.info, self.state, self.model
        tc = cfg.train
        model.set_task(k)
        fresh = st["task_step"] == 0 and st["optimizer"] is None  # (a task resumed mid-way keeps its expert, head)
        if self.spec.warm and k > 0 and fresh:
            warm_start_task_expert(model.backbone, k)
            self._fitted.clear()
        if tc.head_init == "probe" and fresh:
            self._init_head(k)
        params = [p for p in model.parameters() if p.requires_grad]
        if model.distill_lambda > 0 and k > 0:
            if st["drift_ref"] is None:  # the shared experts as the task starts (a resumed task keeps its own)
                st["drift_ref"] = model.shared_reference()
            model.drift_ref = st["drift_ref"]
        opt = torch.optim.AdamW(self._param_groups(params, k), lr=tc.lr, weight_decay=tc.weight_decay)
        items = self.prep.train[k]
        lengths = [len(e.input_ids) for e in items]

        def epoch_batches(epoch: int) -> list[list[int]]:
            return _epoch_batches(lengths, tc.batch_size, cfg.seed, k, epoch, info.world_size, tc.group_by_length)

        per_epoch = len(epoch_batches(0))
        total = tc.epochs * per_epoch
        if tc.max_steps_per_task:
            total = min(total, tc.max_steps_per_task)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(tc.scheduler, total, int(tc.warmup_ratio * total)))
        if st["optimizer"] is not None:
            opt.load_state_dict(st["optimizer"])
            sched.load_state_dict(st["scheduler"])
        forward = DistributedDataParallel(model, device_ids=[info.device.index] if info.device.type == "cuda" else None) \
            if self.kind == "ddp" else model
        reduce = (lambda t: all_reduce_sum(t, info)) if info.enabled else None
        bar = tqdm(total=total, initial=st["task_step"], desc=f"{self.name} task {k + 1}/{len(self.prep.tasks)}",
                   disable=None if info.is_main else True, leave=True, dynamic_ncols=True)
        dev = st["dev_history"][-1]["dev"] if st["dev_history"] else None
        post: dict[str, str] = {}
        while True:
            batches = epoch_batches(st["epoch"])
            model.train()
            while st["step"] < len(batches) and st["task_step"] < total:
                idx = batches[st["step"]]
                batch = _to(collate([items[i] for i in idx[info.rank::info.world_size]], self.prep.encoder.pad_id,
                                    tc.mode), info.device)
                out = forward(**batch, scale=info.world_size / len(idx), reduce=reduce, world=info.world_size)
                opt.zero_grad(set_to_none=True)
                out["loss"].backward()
                if self.kind == "fsdp":  # the replicated trainable parameters, averaged as DDP does
                    average_gradients(params, info)
                if tc.grad_clip:
                    torch.nn.utils.clip_grad_norm_(params, tc.grad_clip)
                opt.step()
                sched.step()
                st["step"] += 1
                st["task_step"] += 1
                self.global_step += 1
                bar.update(1)
                post = {"loss": f"{float(out['task_loss']) / batch['labels'].numel():.3f}"}
                if "disc_loss" in out:
                    post["L_D"] = f"{float(out['disc_loss']):.3f}"
                if dev is not None:
                    post["dev"] = f"{100 * dev:.1f}%"
                bar.set_postfix(post)
                if tc.checkpoint_every and self.global_step % tc.checkpoint_every == 0:
                    st["optimizer"], st["scheduler"] = opt.state_dict(), sched.state_dict()
                    self._save(time.perf_counter() - t0)
            if st["last_eval"] != st["task_step"]:  # end of an epoch or of the task: check dev
                dev = self._dev_check(k, params)
                post["dev"] = f"{100 * dev:.1f}%"
                bar.set_postfix(post)
                model.train()
            if st["task_step"] >= total:
                break
            st["epoch"] += 1
            st["step"] = 0
        bar.close()
        if tc.keep_best and st["best"] is not None:
            with torch.no_grad():
                for p, b in zip(params, st["best"]):
                    p.copy_(b.to(p.device))
        if self.spec.olora:
            merge_expert(model.backbone, k)
        model.drift_ref = None
        model.end_task(k)
        if self.spec.disc_memory and k + 1 < len(self.prep.tasks):
            self._record_memory(k)

    def _param_groups(self, params: list[torch.nn.Parameter], k: int) -> list[dict[str, Any]]:
        """One group, or for ``shared_lr`` from the second task on, the shared experts in a
        group of their own at ``method.shared_lr_scale`` times the learning rate."""
        if not (self.spec.shared_lr and k > 0):
            return [{"params": params}]
        shared = {id(p) for p in adapter_group(self.model.backbone, "shared").values()}
        return [{"params": [p for p in params if id(p) not in shared]},
                {"params": [p for p in params if id(p) in shared], "lr": self.cfg.train.lr * self.cfg.method.shared_lr_scale}]

    def _record_memory(self, k: int) -> None:
        """The discriminator memory of task k: the pooled inputs of ``method.memory_per_task``
        of its training examples (seeded choice), as the finished task routes them."""
        items = self.prep.train[k]
        g = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + k * 1_009 + 7)
        chosen = [items[i] for i in torch.randperm(len(items), generator=g)[:self.cfg.method.memory_per_task].tolist()]
        self.model.eval()
        with self.model.task_view(k):
            parts = [self.model.pooled_inputs(_to(collate(chosen[i:i + self.cfg.train.eval_batch_size],
                                                          self.prep.encoder.pad_id, "classification"), self.info.device))
                     for i in range(0, len(chosen), self.cfg.train.eval_batch_size)]
        self.model.memory[k] = {n: torch.cat([p[n] for p in parts]) for n in parts[0]}

    @torch.no_grad()
    def _features(self, task: int, items: list[Encoded]) -> tuple[torch.Tensor, torch.Tensor]:
        """Pooled features [N, hidden] (routed as ``task``) and labels of ``items``; every process
        computes every feature (its forwards stay in step under FSDP)."""
        model, bs, pad = self.model, self.cfg.train.eval_batch_size, self.prep.encoder.pad_id
        model.eval()
        with model.task_view(task):
            x = [model.encode(_to(collate(items[i:i + bs], pad, "classification"), self.info.device), "test").cpu()
                 for i in range(0, len(items), bs)]
        return torch.cat(x), torch.tensor([e.label for e in items])

    def _fit(self, task: int) -> tuple:
        """The linear probe of ``task`` on the backbone as it stands (probe.py), fitted once per state."""
        if task not in self._fitted:
            self._fitted[task] = fit_probe(*self._features(task, self.prep.train[task]), self.prep.tasks[task].num_classes)
        return self._fitted[task]

    def _probe(self, task: int) -> float:
        """Test accuracy of a linear probe for ``task`` on the backbone as it stands."""
        return probe_accuracy_of(self._fit(task), *self._features(task, self.prep.test[task]))

    @torch.no_grad()
    def _init_head(self, task: int) -> None:
        """``train.head_init=probe``: task ``task``'s head := its probe on the backbone before the task
        (deterministic: no draw from the training RNG; the same on every process)."""
        weight, bias = probe_head(self._fit(task))
        head = self.model.heads[task]
        head.weight.copy_(weight.to(head.weight))
        head.bias.copy_(bias.to(head.bias))

    def _evaluate(self, items: list[Encoded], phase: str, task: int) -> float:
        with self.model.task_view(task):
            return evaluate(self.model, items, phase, self.cfg, self.prep, self.info, synced=self.kind == "fsdp")

    def _dev_check(self, k: int, params: list[torch.Tensor]) -> float:
        st = self.state
        score = self._evaluate(self.prep.dev[k], "train", k)
        st["last_eval"] = st["task_step"]
        st["dev_history"].append({"task": k, "step": st["task_step"], "dev": score})
        improved = st["best_score"] is None or score > st["best_score"]
        if improved and self.cfg.train.keep_best:
            st["best_score"] = score
            st["best"] = [p.detach().cpu().clone() for p in params]
        log.info("%s: task %d step %d: dev %.1f%%%s", self.name, k + 1, st["task_step"], 100 * score,
                 " (best)" if improved else "")
        return score


def run(cfg: RunConfig, resume: bool = False, overwrite: bool = False) -> dict[str, dict[str, Any]]:
    """Run every method of ``cfg`` (a comparison table when there are several); returns
    the per-method results. Works single-process and under torchrun / accelerate. A run
    directory that holds an earlier run is refused unless ``resume`` or ``overwrite``."""
    if not (resume or overwrite):
        refuse_overwrite(cfg.run_dir)
    info = init_distributed()
    try:
        prep = prepare(cfg, info)
        results = {name: MethodRun(cfg, name, prep, info).run(resume) for name in cfg.methods}
        if add_transfer_gain(results) and info.is_main:
            for name, r in results.items():
                write_method_report(cfg.run_dir / name, r)
        if info.is_main:
            write_comparison(cfg.run_dir, results)
            log.info("results in %s (comparison.md)", cfg.run_dir)
        return results
    finally:
        shutdown(info)

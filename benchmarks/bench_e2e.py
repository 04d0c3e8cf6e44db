"""End-to-end MoE-CL training step: fused vs eager vs PEFT single-LoRA, tokens/s and peak memory.

    python -m benchmarks.bench_e2e --quick      # CPU: a tiny Llama (tests the harness)
    python -m benchmarks.bench_e2e              # GPU: Llama-style ~1.1B (TinyLlama shape), bf16

A Llama-style model is built from a config with random weights (nothing is downloaded).
MoE-CL variants: ``mk.inject`` on every FFN projection (gate/up/down), r=8, alpha=16,
dropout 0.05, gate on, 4 tasks, ``mk.set_trainable(task=1)``: shared experts, expert 1 and
the gates train. A step is forward + LM loss + backward + AdamW (lr 2e-4, wd 0.01) on a
one-task batch (MoE-CL trains one task at a time). The MoE-CL discriminator is left out:
its cost (a mean-pooled [B, d] input to a [d, E] linear per layer) does not depend on the
backend. Variants, one row each:

* every fused backend available here: ``triton-addmm``, ``triton-fused`` (the Triton
  backend's two expand modes), ``triton-gemm`` (its natural-order GEMM variant) and ``cuda``, each set on the model with ``mk.set_backend``;
  the fastest is the ``fused`` figure of the docs/spec.md §4 row (``auto_backend`` records what
  ``auto`` resolves to; on a CPU, with none of them available, ``fused`` is auto's choice);
* eager: the same model with ``mk.set_backend(model, "eager")``;
* peft:  the same base weights with one PEFT LoRA adapter on the same modules (the floor a
  single-LoRA user pays).

Before timing, every backend is checked against the ``reference`` backend on a small
mixed-task batch (loss and every trainable gradient), on the same model. Eager and PEFT (the
ratios' denominators) are timed first, then each fused backend that passed; each backend is
isolated: one that raises is recorded under ``errors`` and the others still run. Writes
``e2e.json`` (after the check and after every variant, so a run cut short keeps what it
measured) and ``e2e.md`` under ``--out``; exit status 1 if a check fails or a backend raised.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from pathlib import Path

import torch

import moecl_kernels as mk

from .common import REPO_ROOT, Timer, environment, fmt, md_table, sync, write_json
from .providers import register_triton_variant_backends

# the Triton expand modes and the natural-order gemm variant (arch-chosen), and the CUDA kernels
FUSED_BACKENDS = ("triton-addmm", "triton-fused", "triton-gemm", "cuda")

FFN = ["gate_proj", "up_proj", "down_proj"]
TASKS, TRAIN_TASK = 4, 1
LORA = dict(r=8, alpha=16, dropout=0.05)
# Llama-style model shapes: "gpu" is TinyLlama-1.1B's (1.10e9 parameters), "quick" a toy.
MODELS = {
    "gpu": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                num_key_value_heads=4, vocab_size=32000, batch=4, seq=1024),
    "quick": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=256, batch=2, seq=32),
}
CHECK_BATCH, CHECK_SEQ = 2, 64
# loss relative error, and ||g - g_ref|| / ||g_ref|| over all trainable gradients, per dtype
CHECK_TOL = {torch.float32: (1e-4, 1e-3), torch.bfloat16: (2e-2, 5e-2)}


def build_model(shape: dict, device: torch.device, dtype: torch.dtype, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**{k: v for k, v in shape.items() if k not in ("batch", "seq")},
                      max_position_embeddings=max(2048, shape["seq"]), attn_implementation="sdpa")
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM(cfg)
    return model.to(dtype)


def batch(shape: dict, device: torch.device, seed: int, b: int = 0, s: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, shape["vocab_size"], (b or shape["batch"], s or shape["seq"]), generator=g)
    return ids.to(device), torch.ones_like(ids, device=device)


def loss_and_grads(model, ids, mask, task_ids=None) -> tuple[float, list[torch.Tensor]]:
    params = [p for p in model.parameters() if p.requires_grad]
    kw = {} if task_ids is None else {"task_ids": task_ids}
    loss = model(input_ids=ids, attention_mask=mask, labels=ids, **kw).loss
    grads = torch.autograd.grad(loss, params)
    return float(loss.detach()), [g.detach().float() for g in grads]


def check_backends(model, shape, device, dtype, backends: list[str]) -> dict:
    """Loss and trainable gradients of each backend vs the ``reference`` backend (eval mode:
    no dropout), on a mixed-task batch with non-zero LoRA B matrices."""
    with torch.no_grad():
        g = torch.Generator(device=device).manual_seed(1)
        for layer in mk.moe_layers(model).values():
            for p in [layer.lora_shared_B, *layer.lora_task_B]:
                p.copy_(torch.randn(p.shape, generator=g, device=device) * 0.02)
    ids, mask = batch(shape, device, seed=99, b=CHECK_BATCH, s=min(CHECK_SEQ, shape["seq"]))
    task_ids = torch.tensor([TRAIN_TASK, (TRAIN_TASK + 1) % TASKS])
    model.eval()
    out = {}
    mk.set_backend(model, "reference")
    ref_loss, ref_grads = loss_and_grads(model, ids, mask, task_ids)
    ref_norm = math.sqrt(sum(float(g.pow(2).sum()) for g in ref_grads))
    tol_loss, tol_grad = CHECK_TOL[dtype]
    for name in backends:
        try:
            mk.set_backend(model, name)
            loss, grads = loss_and_grads(model, ids, mask, task_ids)
        except Exception as e:  # noqa: BLE001 - one backend that raises is recorded, not fatal
            out[name] = {"ok": False, "error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
                         "loss_rel_err": math.nan, "grad_rel_err": math.nan, "tol": [tol_loss, tol_grad]}
            continue
        diff = math.sqrt(sum(float((a - b).pow(2).sum()) for a, b in zip(grads, ref_grads)))
        e_loss, e_grad = abs(loss - ref_loss) / abs(ref_loss), diff / max(ref_norm, 1e-30)
        ok = e_loss <= tol_loss and e_grad <= tol_grad  # NaN fails
        out[name] = {"loss": loss, "loss_ref": ref_loss, "loss_rel_err": e_loss, "grad_rel_err": e_grad,
                     "tol": [tol_loss, tol_grad], "ok": bool(ok)}
    model.train()
    return out


def time_training(model, shape, device, timer: Timer, task_ids=None) -> dict:
    """Median optimizer-step time over rotating batches; tokens/s and peak memory."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-4, weight_decay=0.01)
    batches = [batch(shape, device, seed=s) for s in range(2)]
    kw = {} if task_ids is None else {"task_ids": task_ids}

    def step(i):
        ids, mask = batches[i]
        opt.zero_grad(set_to_none=True)
        model(input_ids=ids, attention_mask=mask, labels=ids, **kw).loss.backward()
        opt.step()

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = timer(step, len(batches))
    sync(device)
    med = statistics.median(times)
    tokens = shape["batch"] * shape["seq"]
    return {"times_ms": times, "median_ms": med, "tokens_per_step": tokens, "tokens_per_s": tokens / med * 1e3,
            "trainable_params": sum(p.numel() for p in params),
            "peak_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None}


def fused_backends(probe: torch.Tensor) -> list[str]:
    """The fused backends that can run here: GPU only (on a CPU, Triton would run interpreted
    under ``TRITON_INTERPRET=1``: a test of the kernels, not something to time)."""
    if probe.device.type != "cuda":
        return []
    register_triton_variant_backends()
    out = []
    for name in FUSED_BACKENDS:
        try:
            mk.resolve_backend(name, probe)
        except (mk.BackendUnavailableError, ValueError):
            continue
        out.append(name)
    return out


def run(quick: bool, device: torch.device, save=lambda res: None, layers: int = 0) -> dict:
    shape = dict(MODELS["quick" if quick else "gpu"])
    if layers:
        shape["num_hidden_layers"] = layers
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    timer = (Timer(device, target_ms=200, min_reps=3, max_reps=8, warmup=1) if quick
             else Timer(device, target_ms=1500, min_reps=8, max_reps=30, warmup=3))
    model = build_model(shape, device, dtype)
    n_params = sum(p.numel() for p in model.parameters())
    mk.inject(model, target_modules=FFN, num_tasks=TASKS, gate=True, **LORA)
    mk.set_trainable(model, task=TRAIN_TASK)
    probe = torch.empty(shape["batch"] * shape["seq"], 1, device=device, dtype=dtype)
    auto = mk.resolve_backend("auto", probe)
    fused = fused_backends(probe) or [auto]
    res = {"meta": environment(device), "config": {"model": dict(shape), "params": n_params,
                                                 "dtype": str(dtype).replace("torch.", ""), "tasks": TASKS,
                                                 "train_task": TRAIN_TASK, "targets": FFN, **LORA,
                                                 "optimizer": "AdamW lr 2e-4 wd 0.01"},
           "auto_backend": auto, "fused_backends": fused, "fused_backend": fused[0], "variants": {}}
    res["check"] = check_backends(model, shape, device, dtype, list(dict.fromkeys(["eager", *fused])))
    res["errors"] = {n: c["error"] for n, c in res["check"].items() if "error" in c}
    save(res)

    def timed(name: str, fn) -> None:  # each variant isolated: a failure is recorded, the others still run
        try:
            res["variants"][name] = fn()
        except Exception as e:  # noqa: BLE001 - recorded in the JSON, the run goes on
            res["errors"][name] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            if device.type == "cuda":
                torch.cuda.empty_cache()
        print(f"{name}: {res['variants'].get(name, {}).get('tokens_per_s', res['errors'].get(name))}",
              file=sys.stderr)
        save(res)

    t = torch.full((shape["batch"],), TRAIN_TASK)

    def moecl(backend: str):
        def fn():
            mk.set_backend(model, backend)
            return dict(time_training(model, shape, device, timer, t), backend=backend)
        return fn

    def peft_variant() -> dict:
        from peft import LoraConfig, get_peft_model

        resident = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0  # the MoE-CL model
        base = build_model(shape, device, dtype)
        peft_model = get_peft_model(base, LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"],
                                                     lora_dropout=LORA["dropout"], target_modules=FFN,
                                                     task_type="CAUSAL_LM"))
        try:
            r = dict(time_training(peft_model, shape, device, timer), backend="peft")
            if r["peak_gib"] is not None:  # its own footprint, as if it ran alone
                r["peak_gib"] -= resident / 2**30
            return r
        finally:
            del peft_model, base
            if device.type == "cuda":
                torch.cuda.empty_cache()

    # the ratios' denominators first (eager, PEFT), then every fused backend that passed its check
    if res["check"]["eager"]["ok"]:
        timed("eager", moecl("eager"))
    timed("peft", peft_variant)
    for backend in fused:
        if backend != "eager" and res["check"][backend]["ok"]:
            timed(backend, moecl(backend))
    del model
    v = res["variants"]
    done = [n for n in fused if n in v]
    if done and "eager" in v and "peft" in v:
        best = max(done, key=lambda n: v[n]["tokens_per_s"])
        res["fused_backend"] = best
        res["ratios_per_backend"] = {n: {"vs_eager": v[n]["tokens_per_s"] / v["eager"]["tokens_per_s"],
                                         "vs_peft": v[n]["tokens_per_s"] / v["peft"]["tokens_per_s"]} for n in done}
        res["ratios"] = {"fused_vs_eager": res["ratios_per_backend"][best]["vs_eager"],
                         "fused_vs_peft": res["ratios_per_backend"][best]["vs_peft"]}
    save(res)
    return res


def report_md(res: dict) -> str:
    env, cfg = res["meta"], res["config"]
    m = cfg["model"]
    lines = ["# moecl-kernels end-to-end MoE-CL training step", "",
             f"- device: **{env['device']}**; timer: {env['timer']}; torch {env['torch']}, CUDA {env['cuda']}, "
             f"triton {env['triton']}, peft {env['peft']}, transformers {env['transformers']}; "
             f"commit `{env['git_commit']}`; {env['date_utc']}",
             f"- model: Llama-style, {cfg['params'] / 1e6:,.1f}M parameters (hidden {m['hidden_size']}, FFN "
             f"{m['intermediate_size']}, {m['num_hidden_layers']} layers), {cfg['dtype']}, batch {m['batch']} × "
             f"{m['seq']} tokens; LoRA r={cfg['r']} alpha={cfg['alpha']:g} dropout {cfg['dropout']} "
             f"on {cfg['targets']}"]
    if env["device_type"] != "cuda":
        lines.append("- **CPU run: a toy model testing the harness; not GPU numbers.**")
    lines += ["", "Check against the reference backend (loss, all trainable gradients):", "",
              md_table(["backend", "loss rel err", "grad rel err", "tol", "ok"],
                       [[n, f"{c['loss_rel_err']:.2e}", f"{c['grad_rel_err']:.2e}", c["tol"], c["ok"]]
                        for n, c in res["check"].items()])]
    if res["variants"]:
        rows = [[n, v["backend"], f"{v['median_ms']:.2f}", f"{v['tokens_per_s']:.0f}",
                 fmt(v["peak_gib"], ".2f", "n/a"), f"{v['trainable_params']:,}"] for n, v in res["variants"].items()]
        lines += ["", md_table(["variant", "backend", "step ms (median)", "tokens/s", "peak GiB", "trainable params"],
                               rows)]
    for n, why in res.get("errors", {}).items():
        lines += ["", f"- **{n} failed**: {why}"]
    if "ratios" in res:
        r = res["ratios"]
        per = "; ".join(f"`{n}` {x['vs_eager']:.3f}× eager, {x['vs_peft']:.3f}× PEFT"
                        for n, x in res["ratios_per_backend"].items())
        lines += ["", f"fused / eager tokens/s: **{r['fused_vs_eager']:.3f}×** (target ≥ 1.5); "
                      f"fused / PEFT single-LoRA: **{r['fused_vs_peft']:.3f}×** (target ≥ 0.9); "
                      f"fused = the fastest fused backend, `{res['fused_backend']}` (auto: `{res['auto_backend']}`). "
                      f"Per backend: {per}."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.bench_e2e", description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny model on the CPU: tests the harness")
    ap.add_argument("--out", type=Path, help="output folder (default benchmarks/results/quick or .../gpu)")
    ap.add_argument("--device", help="cpu or cuda[:N] (default: cuda if available, else cpu)")
    ap.add_argument("--layers", type=int, default=0, help="decoder layers (default: the model's: 22 on GPU)")
    args = ap.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if not args.quick and device.type != "cuda":
        print("error: the 1B end-to-end run needs a CUDA device; on a CPU run --quick", file=sys.stderr)
        return 2
    if args.quick and device.type == "cpu":
        torch.set_num_threads(1)  # steadier wall-clock times on a shared CI machine
    out = args.out or REPO_ROOT / "benchmarks" / "results" / ("quick" if args.quick else "gpu")
    res = run(args.quick, device, save=lambda r: write_json(out / "e2e.json", r), layers=args.layers)
    write_json(out / "e2e.json", res)
    md = report_md(res)
    (out / "e2e.md").write_text(md)
    print(md)
    bad = [n for n, c in res["check"].items() if not c["ok"]]
    if bad:
        print(f"FAIL: backends {bad} disagree with the reference backend (or raised); not timed", file=sys.stderr)
    for n, why in res.get("errors", {}).items():
        print(f"error: {n}: {why}", file=sys.stderr)
    return 1 if bad or res.get("errors") else 0


if __name__ == "__main__":
    sys.exit(main())

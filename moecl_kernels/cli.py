"""``python -m moecl_kernels`` / ``moecl``: subcommands.

  demo   (default) the main job: the trainer's offline synthetic benchmark when the trainer
         is installed (MoE-CL with snapshots and no GAN term, MoE-CL, isolated and sequential LoRA), else ``check``
  check  inject the fused layer into a tiny built-in Llama, run a mixed-task forward and
         backward on every available backend, compare with the reference backend and
         print a table (backend, max error, time)
  info   version, backends and why any is unavailable
  train  the reference trainer (``moecl-train``), arguments passed through
  evaluate <run>/<method>    a trained method's test accuracy per task, from its export alone
                             (JSON {task: accuracy} on the last line)
  predict <run>/<method> --task NAME --input file.jsonl [--output out.jsonl]   predicted labels
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Optional, Sequence


def _tiny_llama(seed: int = 0):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=256, max_position_embeddings=128)
    return LlamaForCausalLM(cfg)


def run_check(backends: Optional[Sequence[str]] = None, device: str = "cpu", dtype: str = "float32",
              num_tasks: int = 4, seed: int = 0, out=sys.stdout) -> list[dict]:
    """Check every available backend against the reference on a tiny injected Llama.

    Returns the table rows; raises ``AssertionError`` if a backend disagrees.
    """
    import torch

    import moecl_kernels as mk
    from moecl_kernels.backends import get_backend, registered_backends

    dt = getattr(torch, dtype)
    model = _tiny_llama(seed).to(device=device, dtype=dt)
    mk.inject(model, num_tasks=num_tasks, r=8, alpha=16, dropout=0.0, gate=True)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # non-zero B so every expert contributes
        for layer in mk.moe_layers(model).values():
            for p in [layer.lora_shared_B, *layer.lora_task_B]:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    mk.set_trainable(model, task=1)
    ids = torch.randint(0, 256, (4, 16), generator=g).to(device)
    tasks = torch.tensor([1, 0, 3, -1])  # mixed, one sequence without a task

    def run(backend: str):
        mk.set_backend(model, backend)
        model.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        logits = model(ids, task_ids=tasks).logits
        logits.float().pow(2).mean().backward()
        if device == "cuda":
            torch.cuda.synchronize()
        dt_ms = (time.perf_counter() - t0) * 1e3
        grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
        return logits.detach(), grads, dt_ms

    ref_logits, ref_grads, _ = run("reference")
    rows = []
    names = backends or [b for b in registered_backends() if b != "reference"]
    x_probe = torch.empty(1, device=device, dtype=dt)
    for name in names:
        be = get_backend(name)
        why = "could not be loaded" if be is None else be.unavailable_reason(x_probe)
        if why is not None:
            rows.append(dict(backend=name, status=f"unavailable: {why}"))
            continue
        for _ in range(2):  # warm-up: compilation, allocator and autograd caches
            run(name)
        runs = [run(name) for _ in range(5)]
        logits, grads, _ = runs[-1]
        ms = sorted(r[2] for r in runs)[len(runs) // 2]  # median of 5 steady-state runs
        err = float(((logits - ref_logits).norm() / ref_logits.norm()).item())
        gerr = max(float(((grads[n] - ref_grads[n]).norm() / ref_grads[n].norm().clamp(min=1e-30)).item())
                   for n in ref_grads)
        rows.append(dict(backend=name, status="ok", logits_rel_err=err, grad_rel_err=gerr, ms=ms))
    mk.set_backend(model, None)
    tol = 1e-5 if dt == torch.float32 else 2e-2
    print(f"moecl-kernels {mk.__version__}: tiny Llama ({device}, {dtype}), 3 FFN projections x 2 layers, "
          f"{num_tasks} tasks, mixed batch {tasks.tolist()}; errors relative to the reference backend", file=out)
    print("| backend | status | logits rel. err | grads max rel. err | fwd+bwd ms (median of 5) |", file=out)
    print("| --- | --- | --- | --- | --- |", file=out)
    for r in rows:
        if r["status"] == "ok":
            print(f"| {r['backend']} | ok | {r['logits_rel_err']:.2e} | {r['grad_rel_err']:.2e} | {r['ms']:.1f} |", file=out)
        else:
            print(f"| {r['backend']} | {r['status']} | | | |", file=out)
    bad = [r["backend"] for r in rows if r["status"] == "ok" and max(r["logits_rel_err"], r["grad_rel_err"]) > tol]
    if bad:
        raise AssertionError(f"backends {bad} disagree with the reference beyond {tol:g}")
    return rows


def _info() -> None:
    import torch

    import moecl_kernels as mk
    from moecl_kernels.backends import get_backend, load_error, registered_backends

    print(f"moecl-kernels {mk.__version__}, torch {torch.__version__}, CUDA available: {torch.cuda.is_available()}")
    probes = [torch.empty(1)] + ([torch.empty(1, device="cuda", dtype=torch.bfloat16)] if torch.cuda.is_available() else [])
    for name in registered_backends():
        be = get_backend(name)
        for x in probes:
            why = load_error(name) if be is None else be.unavailable_reason(x)
            print(f"  {name:10s} {str(x.device):5s} {'available' if why is None else 'unavailable: ' + why}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("train", "demo"):  # the trainer parses its own arguments
        try:
            from moecl_kernels.trainer.cli import main as train_main
        except ImportError:  # a trimmed install without the trainer: the kernel check is the main job
            run_check(device="cuda" if _cuda() else "cpu")
            return 0
        rest = argv[1:]
        return int(train_main(rest if argv[:1] == ["train"] else ["demo", *rest]) or 0)
    if argv[0] in ("evaluate", "predict"):  # a trained run's export (trainer/export.py)
        from moecl_kernels.trainer.export import main as export_main

        return export_main(argv)
    p = argparse.ArgumentParser(prog="python -m moecl_kernels", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd")
    c = sub.add_parser("check", help="check every backend against the reference on a tiny injected Llama")
    c.add_argument("--device", default="cuda" if _cuda() else "cpu")
    c.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16", "float64"])
    c.add_argument("--backends", nargs="*", default=None)
    sub.add_parser("info", help="version and backend availability")
    sub.add_parser("demo", help="the main job: the trainer's offline synthetic benchmark (default)")
    sub.add_parser("train", help="the reference trainer; see `python -m moecl_kernels train --help`")
    sub.add_parser("evaluate", help="a trained method's test accuracy per task, from its export (JSON)")
    sub.add_parser("predict", help="label a JSONL file with a trained method's export")
    args = p.parse_args(argv)
    if args.cmd == "info":
        _info()
        return 0
    problem = _check_args_problem(args.device, args.backends)
    if problem:
        print(f"moecl check: {problem}", file=sys.stderr)
        return 2
    run_check(args.backends, device=args.device, dtype=args.dtype)
    return 0


def _check_args_problem(device: str, backends: Optional[Sequence[str]]) -> Optional[str]:
    """Why ``check --device/--backends`` cannot run (None if it can)."""
    import torch

    from moecl_kernels.backends import registered_backends

    try:
        dev = torch.device(device)
    except RuntimeError as e:
        return f"--device {device}: not a device ({e})"
    if dev.type == "cuda" and not torch.cuda.is_available():
        return f"--device {device}: no CUDA device is available to this torch ({torch.__version__}); use --device cpu"
    if dev.type not in ("cpu", "cuda"):
        return f"--device {device}: check runs on cpu or cuda"
    unknown = [b for b in backends or [] if b not in registered_backends()]
    if unknown:
        return f"--backends: unknown backend(s) {unknown}; known: {list(registered_backends())}"
    return None


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    sys.exit(main())

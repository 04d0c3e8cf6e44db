"""``moecl-train``: continual training of MoE-CL and its baselines.

    moecl-train [demo]                           # the offline demo: synthetic benchmark, moecl_snap_nogan/moecl/isolated
                                                 # (rank r and 2r)/sequential LoRA
    moecl-train -c run.yaml train.lr=2e-4 methods=[moecl,olora]
    moecl-train -c run.yaml --resume             # continue a killed run (same config)
    torchrun --nproc_per_node 2 -m moecl_kernels.trainer.cli -c run.yaml
    python -m moecl_kernels train ...            # the same, through the package CLI
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Optional, Sequence

from .config import ConfigError, load_config
from .methods import METHODS


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="moecl-train",
        description="Continual training over a task sequence: MoE-CL and baselines "
                    f"({', '.join(METHODS)}); writes JSON/markdown reports and accuracy-matrix heatmaps.",
        epilog="Overrides are dotted config keys with YAML values, e.g. train.epochs=1 data.benchmark=mtl5 "
               "data.root=/data/mtl5 data.order=2 'methods=[moecl,seq_lora,olora]' model.name_or_path=/models/llama",
    )
    p.add_argument("-c", "--config", help="YAML or JSON run config (default: the built-in demo)")
    p.add_argument("overrides", nargs="*",
                   help="key.subkey=value config overrides (a leading 'demo' names the default demo config)")
    p.add_argument("--resume", action="store_true", help="continue from the run's checkpoints (same config)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the reports and checkpoints of an earlier run of the same name (a run refuses "
                        "to without it; the built-in demo replaces its own)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("-q", "--quiet", action="store_true", help="warnings only")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    # overrides may come before, between or after the flags (`-c run.yaml a=1 -q b=2`)
    args = build_parser().parse_intermixed_args(list(argv) if argv is not None else None)
    main_process = int(os.environ.get("RANK", "0")) == 0  # torchrun / accelerate: only rank 0 reports
    logging.basicConfig(level=logging.WARNING if args.quiet or not main_process else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    overrides = args.overrides[1:] if args.overrides[:1] == ["demo"] else args.overrides
    try:
        cfg = load_config(args.config, overrides)
    except ConfigError as e:
        print(f"moecl-train: config error: {e}", file=sys.stderr)
        return 2
    if args.print_config:
        import yaml

        print(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        return 0
    from ..backends import BackendUnavailableError
    from .checkpoint import CheckpointError, RunExistsError
    from .data import DataFormatError
    from .engine import run
    from .report import comparison_markdown, level_line

    from tqdm.contrib.logging import logging_redirect_tqdm

    overwrite = args.overwrite or _builtin_demo(args, cfg)
    if overwrite and not args.resume and main_process and cfg.run_dir.is_dir() and any(cfg.run_dir.iterdir()):
        print(f"moecl-train: replacing the earlier run in {cfg.run_dir}"
              + ("" if args.overwrite else " (the built-in demo replaces its own; other runs refuse without "
                 "--overwrite)"), file=sys.stderr)
    try:
        with logging_redirect_tqdm():  # log lines above the progress bars, not through them
            results = run(cfg, resume=args.resume, overwrite=overwrite)
    except (DataFormatError, FileNotFoundError, CheckpointError, BackendUnavailableError) as e:
        kind = {RunExistsError: "run", CheckpointError: "checkpoint", BackendUnavailableError: "backend"}.get(
            type(e), "data")
        print(f"moecl-train: {kind} error: {e}", file=sys.stderr)
        return 2
    if main_process:
        print(level_line(results))
        print(comparison_markdown(results))
        print(f"reports: {cfg.run_dir} (comparison.md, <method>/report.md)")
        print("heatmaps (accuracy matrix R):")
        for name in results:
            print(f"  {cfg.run_dir / name / 'heatmap.png'}")
    return 0


def _builtin_demo(args: argparse.Namespace, cfg) -> bool:
    """The built-in demo (no config file, its name and its synthetic data): it replaces its own earlier run."""
    return args.config is None and cfg.name == "demo" and cfg.data.benchmark == "synthetic"


if __name__ == "__main__":
    sys.exit(main())

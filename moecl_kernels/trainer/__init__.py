"""Reference MoE-CL trainer: continual training of MoE-CL and its baselines over a
task sequence, with ACC/BWT/FWT reports (docs/spec.md §6). Entry points: :func:`run` and the
``moecl-train`` CLI (:func:`moecl_kernels.trainer.cli.main`)."""

from .config import RunConfig, load_config
from .methods import METHODS
from .engine import run
from .metrics import cl_metrics

__all__ = ["METHODS", "RunConfig", "load_config", "run", "cl_metrics"]

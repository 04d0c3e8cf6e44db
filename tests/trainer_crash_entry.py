"""``moecl-train`` that dies at the N-th optimizer step ($MOECL_TEST_CRASH_AT_STEP), as a
killed job would: for resume tests under torchrun (every process dies at the same step)."""

import os
import sys

import torch

from moecl_kernels.trainer import cli

_real_step = torch.optim.AdamW.step
_calls = {"n": 0}


def _step(self, *args, **kwargs):
    _calls["n"] += 1
    if _calls["n"] == int(os.environ["MOECL_TEST_CRASH_AT_STEP"]):
        os._exit(17)  # no clean-up, no report: like a kill
    return _real_step(self, *args, **kwargs)


torch.optim.AdamW.step = _step
sys.exit(cli.main(sys.argv[1:]))

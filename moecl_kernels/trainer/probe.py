"""Forward transfer measured with linear probes (docs/spec.md §6).

With per-task classification heads, a task's head is untrained until its task, so the
accuracy-matrix FWT, ``R[i-1][i] - b[i]``, is chance minus chance for every method. The
probe FWT asks instead what the backbone already knows about task i before training it:

    P[i]  = test accuracy of a linear probe fitted on task i's training features, taken from
            the backbone as it stands before task i (routed as task i is at test time)
    P0[i] = the same on the untrained backbone (every LoRA B is zero: the pretrained model)
    FWT   = mean_{i >= 1} (P[i] - P0[i])

The probe is multinomial logistic regression on standardised features, fitted full-batch
by L-BFGS from zero (deterministic; no draw from the training RNG, so adding the probe
changes no training number). Isolated LoRA's FWT is 0 by construction.

The same probe can start a task's head (``train.head_init=probe``: linear probing, then fine-tuning,
"LP-FT", Kumar et al. 2022): :func:`probe_head` folds the standardisation into the weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

PROBE_L2 = 1e-3  # weight decay of the probe (on standardised features)
PROBE_ITERS = 200


def fit_probe(x: Tensor, y: Tensor, num_classes: int, l2: float = PROBE_L2, iters: int = PROBE_ITERS):
    """(mean, std, W [d, C], b [C]) of a logistic-regression probe fitted on x [N, d], y [N]."""
    x = x.double()
    mean, std = x.mean(0), x.std(0).clamp(min=1e-6)
    z = (x - mean) / std
    W = torch.zeros(z.shape[1], num_classes, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([W, b], lr=1.0, max_iter=iters, history_size=20, line_search_fn="strong_wolfe",
                            tolerance_grad=1e-9, tolerance_change=1e-12)

    def closure() -> Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(z @ W + b, y) + l2 * W.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return mean, std, W.detach(), b.detach()


def probe_head(probe: tuple[Tensor, Tensor, Tensor, Tensor]) -> tuple[Tensor, Tensor]:
    """(weight [C, d], bias [C]) of the linear layer computing the probe's logits from raw features:
    ((x - mean) / std) W + b = x (W / std)  + (b - (mean / std) W)."""
    mean, std, W, b = probe
    return (W / std[:, None]).T.contiguous(), b - (mean / std) @ W


def probe_accuracy_of(probe: tuple[Tensor, Tensor, Tensor, Tensor], test_x: Tensor, test_y: Tensor) -> float:
    mean, std, W, b = probe
    pred = (((test_x.double() - mean) / std) @ W + b).argmax(-1)
    return float((pred == test_y).double().mean())


def probe_accuracy(train_x: Tensor, train_y: Tensor, test_x: Tensor, test_y: Tensor, num_classes: int) -> float:
    """Test accuracy of a probe fitted on the training features."""
    return probe_accuracy_of(fit_probe(train_x, train_y, num_classes), test_x, test_y)

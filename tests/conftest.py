import os

import torch

# Without a GPU, Triton kernels run under its interpreter. Triton reads this when a kernel is
# defined, so it is set here, before any test module can import triton or the Triton backend.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def poison_uninitialized_memory():
    """Every torch.empty (kernel outputs, partials, workspaces) starts as NaN (INT_MAX for
    integers), so an output element a kernel forgets to write fails the comparison."""
    from benchmarks.common import poisoned  # the benchmarks' checks poison the same way

    with poisoned(quiet=False):
        yield

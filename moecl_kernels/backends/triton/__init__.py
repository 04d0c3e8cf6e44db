"""The ``triton`` backend of the fused MoE-LoRA ops (``backend="triton"``).

``backend.py`` orchestrates the linear op's launches, ``kernels.py`` holds its Triton kernels
and ``configs.py`` the tile tables and the opt-in autotuner; ``ffn.py`` / ``ffn_kernels.py``
are the FFN-level op (docs/spec.md §1.3), reusing the linear stages. Runs on CUDA; on CPU only
under the Triton interpreter (``TRITON_INTERPRET=1`` set before triton is imported), for tests.
"""

from .backend import TritonBackend as LinearTritonBackend
from .configs import Tile, TileTable
from .ffn import TritonFFN


class TritonBackend(TritonFFN, LinearTritonBackend):
    """The ``triton`` backend: the linear op (``backend.py``) and the FFN-level op (``ffn.py``)."""


__all__ = ["TritonBackend", "LinearTritonBackend", "Tile", "TileTable"]

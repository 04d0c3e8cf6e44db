"""The ``triton`` backend of the fused MoE-LoRA op (``backend="triton"``).

``backend.py`` orchestrates the launches, ``kernels.py`` holds the Triton kernels and
``configs.py`` the tile tables and the opt-in autotuner. Runs on CUDA; on CPU only under
the Triton interpreter (``TRITON_INTERPRET=1`` set before triton is imported), for tests.
"""

from .backend import TritonBackend
from .configs import Tile, TileTable

__all__ = ["TritonBackend", "Tile", "TileTable"]

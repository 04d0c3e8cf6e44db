"""Benchmarks of moecl-kernels: the op microbenchmark (``bench_op``) and the end-to-end
MoE-CL training step (``bench_e2e``). Run them as modules from the repository root,
e.g. ``python -m benchmarks.bench_op --quick``; see ``benchmarks/README.md``."""

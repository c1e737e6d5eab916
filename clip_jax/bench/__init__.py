"""Throughput benchmarks: `python -m clip_jax.bench <name>`."""

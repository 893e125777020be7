"""Benchmarks of ipmt-fast: per op (``python -m benches.ops``) and per layer count (``python -m benches.layers``).

Run from a checkout; ``tests/`` is the CI suite and does not collect this folder.
"""

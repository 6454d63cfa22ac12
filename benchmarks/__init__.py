"""Benchmarks of facetrt: ``python -m benchmarks.inprocess`` (see ``docs/performance.md``).

They drive only the public API (``facetrt.open_runtime``, ``facetrt.RuntimeConfig``,
``facetrt.examples``) and measure their baselines (raw LMDB, trio, an ideal group-commit actor)
in the same run, so that figures from different machines can be compared as ratios.
"""

"""Benchmarks of facetrt (see ``docs/performance.md``).

``python -m benchmarks.inprocess`` drives the embedded runtime through the public API;
``python -m benchmarks.daemon`` drives a real ``facetrt serve`` process over loopback (TCP and
HTTP) from separate load-generator processes. Both measure their baselines (raw LMDB, trio, an
ideal group-commit actor, an echo server) in the same run, so that figures from different
machines can be compared as ratios.
"""

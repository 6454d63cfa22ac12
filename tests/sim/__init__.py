"""Seeded simulation (issue 5, point 1): one seed drives workload, faults and scheduling.

Replay a seed: ``.venv/bin/python -m tests.sim --seed N``; many seeds: ``scripts/sim_run.py``;
what is checked and the latest figures: docs/reliability.md, section 1.
"""

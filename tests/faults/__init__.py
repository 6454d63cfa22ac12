"""Storage faults and full disks against the real daemon (issue 5, point 4).

``daemon.py`` runs ``facetrt serve`` in a child process, under libfiu's ``fiu-run`` (Debian
``fiu-utils``) so that the test can fail ``fdatasync``, ``fsync``, ``pwrite`` and ``writev``
of the running daemon with ``fiu-ctrl``, or with a file size limit, on a data directory that
may sit on a small tmpfs (``disk.py``). ``workload.py`` drives counters and records every
acknowledgement; ``verify.py`` checks that every acknowledged write is there and that every
LMDB environment verifies. The tests (``test_*.py``) run short, deterministic scenarios;
``scripts/fault_run.py`` runs a long random campaign with the same parts.
"""

"""Coverage-guided fuzz targets (atheris) for the inputs a hostile peer controls.

Each ``fuzz_*.py`` is a script, ``python fuzz/fuzz_frames.py -runs=N [corpus dirs]``, whose
``check(data)`` is the oracle for one input: only the documented outcomes are allowed, anything
else (another exception, a wrong event, a buffer over its limit) fails an ``assert`` and libFuzzer
records the input as a crash. ``docs/reliability.md`` section 5 has the commands and figures.
"""

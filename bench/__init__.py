"""carevault benchmarks: `python -m bench` (see bench/README.md).

Speed is measured only here, never in the test suite. Every figure is reported as a ratio to a
baseline measured in the same run, because absolute numbers on a shared 2-core machine are noise.
"""

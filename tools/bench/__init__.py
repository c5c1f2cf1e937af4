"""Benchmarks for sharedcompute; each module runs as a script (``python tools/bench/NAME.py``)."""

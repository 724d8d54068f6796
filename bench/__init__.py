"""Measurements that write JSON under bench/results/ (never timed unit tests).

`python -m bench.linear`, `python -m bench.moe`, `python -m bench.generate`. Each records the
machine, the thread count and the library versions next to its numbers.
"""

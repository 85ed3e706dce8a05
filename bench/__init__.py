"""The nbdnats benchmark suite (``make bench``, ``make bench-quick``); see bench/README.md.

``bench.harness`` holds the pure logic (results, statistics, targets) and is covered by the
unit tests; ``bench.run`` starts the real programs and measures them; ``bench.plots`` draws.
"""

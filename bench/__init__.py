"""hyperlex benchmarks (issue 7): ratios against the plain alternatives, measured in one run.

Run ``python -m bench`` from the repository root (``--quick`` for a smoke run, ``--base DIR``
for another base model). Never part of the timed test suite; ``tests/test_bench.py`` runs the
quick mode as a smoke test only.
"""

from bench.common import Config, Row, render_table, run

__all__ = ["Config", "Row", "render_table", "run"]

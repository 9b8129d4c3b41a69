"""Measure hyperlex against the plain alternatives in one run and print a table of ratios
(docs/performance.md explains each row)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from bench.common import MEASUREMENTS, Config, render_table, rows_of, run, write_json


def main(argv: list[str] | None = None, prog: str = "python -m bench") -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__)
    parser.add_argument("--quick", action="store_true",
                        help="tiny sizes (4 personas, 2 repeats, 4 new tokens): a smoke run")
    parser.add_argument("--json", type=Path, default=Path("bench-results.json"),
                        help="where to write the JSON report (default: %(default)s)")
    parser.add_argument("--only", default=None,
                        help=f"comma list of measurements, e.g. P1,P3 ({' '.join(MEASUREMENTS)})")
    parser.add_argument("--base", default=None,
                        help="base model directory (default: the embedded model); personas "
                        "with random adapters are made for it")
    parser.add_argument("--personas", type=int, default=None, help="resident personas (32)")
    parser.add_argument("--repeats", type=int, default=None, help="repeats per figure (5)")
    args = parser.parse_args(argv)
    overrides = {k: v for k, v in (("base", args.base), ("personas", args.personas),
                                   ("repeats", args.repeats)) if v is not None}
    config = Config.quick_config(**overrides) if args.quick else Config(**overrides)
    only = args.only.split(",") if args.only else None
    report = run(config, only, log=lambda msg: print(msg, file=sys.stderr, flush=True))
    print(render_table(rows_of(report)))
    write_json(report, args.json)
    print(f"\nJSON written to {args.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

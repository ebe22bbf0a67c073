"""The ablation as DVC experiments: every row of scripts/ablation_table.py on its sequences over the test
seeds, queued and run `--jobs` at a time, then docs/ablation.md.

    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 python scripts/run_ablation.py --jobs 2   # make ablation
    python scripts/run_ablation.py --rows no-anchors --seeds 0                    # some rows, some seeds
    python scripts/run_ablation.py --table-only --rev <commit>                    # the table alone

One row, one seed, by hand: `dvc exp run -S benchmark=embedded-classil -S seed=1 -S <each of the row's
overrides>`. Experiments run on the code in the workspace (scripts/run_suite.py).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from moder.params import ParamsError  # noqa: E402
from scripts.ablation_table import BOTH, ROWS  # noqa: E402
from scripts.run_suite import dvc, run_queued, write_table  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    parser.add_argument("--table-only", action="store_true", help="only rewrite docs/ablation.md")
    parser.add_argument("--jobs", type=int, default=1, help="experiments run at once (dvc queue start -j)")
    parser.add_argument("--out", type=Path, default=Path("docs/ablation.md"))
    parser.add_argument("--rev", default="HEAD", help="with --table-only: the commit the experiments were queued on")
    args = parser.parse_args()
    try:
        if not args.table_only:
            # row-major: the first row's experiments pre-train each seed's backbone once (in parallel under
            # --jobs), the later ones restore it from DVC's run cache
            ablation = [
                (f"{sequence}-{row}-s{seed}", sequence, [f"seed={seed}", *ROWS[row][2]])
                for sequence in BOTH
                for row in args.rows
                for seed in args.seeds
                if sequence in ROWS[row][1]
            ]
            args.rev = run_queued(ablation, args.jobs)
        show = dvc("exp", "show", "--json", "--rev", args.rev, capture=True)
    except (subprocess.CalledProcessError, ParamsError) as error:
        sys.exit(f"error: {error}")
    write_table(["scripts/ablation_table.py"], show, args.out)


if __name__ == "__main__":
    main()

"""Stage `params`: validate the whole params file before anything else runs.

Every stage validates the whole file too, but when a typo lands in a section no stage re-runs
for, only this stage (which depends on params.yaml as a file) notices it. `make run` and the
Prefect flow call it first as well.
"""

from __future__ import annotations

from stages.common import parser, run_cli


def main() -> None:
    cli = parser(__doc__)
    run_cli(
        lambda args, params: print(
            f"{args.params}: valid ({params.benchmark.name}, {len(params.datasets)} datasets, "
            f"{len(params.tasks)} tasks)"
        ),
        cli.parse_args(),
    )


if __name__ == "__main__":
    main()

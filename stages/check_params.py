"""Stage `params`: validate the whole params file, and find every image dataset it names, before anything
else runs.

Every stage validates the whole file too, but when a typo lands in a section no stage re-runs
for, only this stage (which depends on params.yaml as a file) notices it. `make run` and the
Prefect flow call it first as well. Datasets are listed, not decoded: a missing or empty one fails
here, in seconds, instead of in its extract stage after the backbone's weights were fetched.
It also notes every value of the params file that conf/ does not compose (stages/compose.py): a hand edit,
which the next compose rewrites away.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from moder.clip import text_layers
from moder.datasets import SPLITS, DatasetFormatError, DatasetNotFound, load_split
from moder.params import Params, ParamsError, read_yaml
from stages.common import parser, run_cli
from stages.compose import conf_dir, departures


def check_model(params: Params) -> None:
    """Settings that only the model's shape can refuse, from its config (no weights): the LoRA layers (the
    finetune baseline's LoRA reads them whatever the experts' kind)."""
    depth = text_layers(params.model.architecture)
    outside = [layer for layer in params.expert.lora.layers or [] if not -depth <= layer < depth]
    if outside:
        raise ParamsError(
            f"expert.lora.layers: {outside} outside the {depth} text layers of {params.model.architecture} "
            f"(0..{depth - 1}, or -{depth}..-1 from the end)"
        )


def check_datasets(params: Params) -> list[str]:
    """One line per image dataset the tasks use (its images per split); a missing or empty one is an
    error naming its key in params.yaml."""
    lines = []
    for key in dict.fromkeys(task.dataset for task in params.tasks.values()):
        spec = params.datasets[key]
        if spec.root is None:  # rendered by the pipeline itself (source: embedded)
            continue
        sizes = []
        for split in SPLITS:
            try:
                sizes.append(f"{len(load_split(spec.source, spec.root, split)):,} {split}")
            except (DatasetNotFound, DatasetFormatError) as error:
                raise type(error)(f"datasets.{key}: {error}") from None
        lines.append(f"  datasets.{key}: {', '.join(sizes)} images under {spec.root}")
    return lines


def departure_notes(path: Path) -> list[str]:
    """One line per value of the params file that its conf/ does not compose (none without a conf/): an
    experiment's `-S` override or a hand edit, which the next compose (`make run`, `dvc exp run`) rewrites
    away: settings belong in conf/."""
    conf = conf_dir(path)
    if not (conf / "config.yaml").is_file():
        return []
    found = departures(read_yaml(path.read_text(encoding="utf-8")), conf)
    return [
        f"note: {path}: {key} = {here!r}, {conf}/ composes {there!r} (an override of this run or an edit; "
        f"the next compose rewrites {path} from {conf}/)"
        for key, (here, there) in sorted(found.items())
    ]


def check(params: Params, path: str) -> None:
    check_model(params)
    lines = check_datasets(params)
    print(f"{path}: valid ({params.benchmark.name}, {len(params.datasets)} datasets, {len(params.tasks)} tasks)")
    for line in lines:
        print(line)
    for note in departure_notes(Path(path)):
        print(note, file=sys.stderr)


def cli() -> argparse.ArgumentParser:
    return parser(__doc__)


def run(args: argparse.Namespace, params: Params) -> None:
    check(params, args.params)


def main() -> None:
    run_cli(run, cli().parse_args())


if __name__ == "__main__":
    main()

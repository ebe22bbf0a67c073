"""Select a benchmark: replace params.yaml's benchmark block with the preset configs/<name>.yaml."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

from moder.io import atomic_path
from moder.params import ParamsError, parse_params

CONFIGS = Path("configs")
MARKER = "# Benchmark preset: "


def use_benchmark(name: str, params_path: Path = Path("params.yaml"), configs: Path = CONFIGS) -> None:
    """Everything from the marker line to the end of params.yaml becomes the preset; the rest is kept verbatim."""
    preset = configs / f"{name}.yaml"
    if not preset.is_file():
        known = ", ".join(sorted(p.stem for p in configs.glob("*.yaml")))
        raise ParamsError(f"no benchmark preset {preset}; presets: {known}")
    text = params_path.read_text()
    if MARKER not in text:
        raise ParamsError(f"{params_path}: no line starting with {MARKER!r} marks where the benchmark block begins")
    updated = text[: text.index(MARKER)] + f"{MARKER}{preset.as_posix()}\n" + preset.read_text()
    parse_params(yaml.safe_load(updated), f"{params_path} with {preset}")
    with atomic_path(params_path) as temporary:
        temporary.write_text(updated)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("name", help="a preset in configs/, e.g. embedded-mtil or embedded-classil")
    parser.add_argument("--params", default="params.yaml", type=Path)
    args = parser.parse_args()
    try:
        use_benchmark(args.name, args.params)
    except ParamsError as error:
        sys.exit(f"error: {error}")
    print(f"{args.params}: benchmark set to {args.name}")


if __name__ == "__main__":
    main()

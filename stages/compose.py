"""Write params.yaml from conf/: conf/config.yaml composed by Hydra with one benchmark preset
(conf/benchmark/<name>.yaml) and any overrides, exactly as `dvc exp run` composes it (DVC's Hydra
composition, switched on in .dvc/config).

    python -m stages.compose                                   # conf/ again, with the preset in use
    python -m stages.compose benchmark=embedded-classil        # another preset
    python -m stages.compose benchmark=mtil-order1 retrieval.k=8

params.yaml may hold values that conf/ does not (a hand edit, or an experiment's `-S` override brought
back by `dvc exp apply`). Composing would drop them, so this refuses and names them, unless each is
given again as an override or --discard says to drop them. A params.yaml that is the last composition
this wrote (kept in .dvc/tmp/) or the committed one holds no edit: then edits of conf/ are simply taken.
`make run` composes first, so edits to conf/ take effect and edits to params.yaml are never dropped
unseen; the `params` stage names any such departure at every `dvc repro`.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from moder.io import atomic_path
from moder.params import ParamsError, parse_params

CONF = "conf"  # next to params.yaml; DVC's default hydra.config_dir


def conf_dir(params_path: Path) -> Path:
    return params_path.parent / CONF


def compose_text(conf: Path, overrides: Sequence[str]) -> str:
    """params.yaml's text as `dvc exp run -S <overrides>` writes it (dvc.utils.hydra.compose_and_dump)."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    if not (conf / "config.yaml").is_file():
        raise ParamsError(f"{conf / 'config.yaml'} not found: params.yaml is composed from it")
    try:
        with initialize_config_dir(str(conf.resolve()), version_base=None):
            config = compose(config_name="config", overrides=list(overrides))
        OmegaConf.resolve(config)
    except (HydraException, OmegaConfBaseException) as error:
        # Hydra lists the available presets over several lines, then its search path
        reason = " ".join(str(error).split("Config search path")[0].split())
        raise ParamsError(f"{conf}/ with {' '.join(overrides) or 'no overrides'}: {reason}") from None
    return OmegaConf.to_yaml(config)


def compose_data(conf: Path, overrides: Sequence[str]) -> dict[str, Any]:
    """The composition `compose_text` writes, as data."""
    return yaml.safe_load(compose_text(conf, overrides))


def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted keys to leaf values (lists are leaves), as `-S` names them."""
    if not isinstance(data, dict) or not data:
        return {prefix: data}
    flat: dict[str, Any] = {}
    for key, value in data.items():
        flat.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def preset_of(data: dict) -> str | None:
    benchmark = data.get("benchmark") if isinstance(data, dict) else None
    return benchmark.get("preset") if isinstance(benchmark, dict) else None


class _Absent:
    def __repr__(self) -> str:
        return "absent"


ABSENT: Any = _Absent()  # a key on one side only (None is a value: `gate: null`)


def departures(data: dict, conf: Path) -> dict[str, tuple[Any, Any]]:
    """key -> (value in `data`, value conf/ composes with the same preset) wherever they differ; ABSENT
    stands for a key the side does not have."""
    preset = preset_of(data)
    here, there = flatten(data), flatten(compose_data(conf, [f"benchmark={preset}"] if preset else []))
    found = {key: (here.get(key, ABSENT), there.get(key, ABSENT)) for key in {**here, **there}}
    return {key: pair for key, pair in found.items() if pair[0] != pair[1]}


def as_override(key: str, value: Any) -> str:
    return f"{key}={json.dumps(value)}"


def stamp_of(path: Path) -> Path:
    """Where the last text compose_params wrote to `path` is kept: DVC's untracked temporary directory."""
    return path.parent / ".dvc" / "tmp" / f"composed-{path.name}"


def committed_text(path: Path) -> str | None:
    """`path` as the last commit has it, or None (no git, not committed)."""
    shown = subprocess.run(
        ["git", "show", f"HEAD:./{path.name}"], cwd=path.parent, capture_output=True, text=True, check=False
    )
    return shown.stdout if shown.returncode == 0 else None


def composed_unchanged(path: Path, text: str) -> bool:
    """Whether `text`, the content of `path`, is a composition nobody edited since: the one this tool
    wrote last, or the committed one (a fresh clone). Then an edit of conf/ is no departure to keep."""
    stamp = stamp_of(path)
    return (stamp.is_file() and stamp.read_text(encoding="utf-8") == text) or committed_text(path) == text


def compose_params(path: Path, overrides: Sequence[str], discard: bool = False) -> str:
    """Compose `path` from its conf/ with `overrides` (keeping its preset unless one is given); refuses,
    naming them, to drop values of `path` that the new composition would change, unless `path` is a
    composition nobody edited since (composed_unchanged)."""
    conf = conf_dir(path)
    before = path.read_text(encoding="utf-8") if path.is_file() else ""
    current = yaml.safe_load(before) if before else None
    current = current if isinstance(current, dict) else {}
    overrides = list(overrides)
    if preset_of(current) and not any(item.split("=", 1)[0].lstrip("+~") == "benchmark" for item in overrides):
        overrides.insert(0, f"benchmark={preset_of(current)}")
    text = compose_text(conf, overrides)
    data = yaml.safe_load(text)
    composed = flatten(data)
    if current and not discard and not composed_unchanged(path, before):
        lost = {
            key: value
            for key, (value, _) in departures(current, conf).items()
            if value is not ABSENT and composed.get(key, ABSENT) != value
        }
        if lost:
            raise ParamsError(
                f"{path} holds values {conf}/ does not, which composing would drop: "
                f"{', '.join(as_override(key, value) for key, value in sorted(lost.items()))}; "
                f"put them in {conf}/, give them again as overrides, or pass --discard"
            )
    parse_params(data, f"{conf}/ with {' '.join(overrides)}")
    if before != text:
        with atomic_path(path) as temporary:
            temporary.write_text(text, encoding="utf-8")
    if stamp_of(path).parent.parent.is_dir():  # a DVC project
        stamp_of(path).parent.mkdir(exist_ok=True)
        with atomic_path(stamp_of(path)) as temporary:
            temporary.write_text(text, encoding="utf-8")
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. benchmark=embedded-classil retrieval.k=8")
    parser.add_argument("--params", default="params.yaml", type=Path, help="the file to write (default: params.yaml)")
    parser.add_argument("--discard", action="store_true", help="drop values of the params file that conf/ lacks")
    args = parser.parse_args()
    try:
        data = yaml.safe_load(compose_params(args.params, args.overrides, args.discard))
    except (ParamsError, OSError) as error:
        sys.exit(f"error: {error}")
    print(f"{args.params}: composed from {conf_dir(args.params)}/ ({data['benchmark']['preset']})")


if __name__ == "__main__":
    main()

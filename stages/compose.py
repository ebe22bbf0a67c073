"""Write params.yaml from conf/: conf/config.yaml composed by Hydra with its benchmark preset
(conf/benchmark/<name>.yaml) and the overrides kept in conf/local/overrides.yaml, exactly as `dvc exp run`
composes it (DVC's Hydra composition, switched on in .dvc/config). params.yaml is generated: its first line
says so, and every compose rewrites it from conf/ (a hand edit of it does not survive; edit conf/).

    python -m stages.compose                                   # params.yaml from conf/ as it is
    python -m stages.compose benchmark=embedded-classil        # another preset, kept for later composes
    python -m stages.compose benchmark=mtil-order1 retrieval.k=8
    python -m stages.compose --reset                           # forget the kept overrides

Overrides given here are kept in conf/local/overrides.yaml (merged with those already there), a config that
conf/config.yaml's defaults list composes last: `make run`, `dvc repro` after it and `dvc exp run` all
compose them, until --reset removes the file. `dvc exp run -S key=value` overrides win over it for that
experiment, as DVC's own overrides do.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from moder.io import atomic_path
from moder.params import ParamsError, parse_params

CONF = "conf"  # next to params.yaml; DVC's default hydra.config_dir
KEPT = Path("local") / "overrides.yaml"  # below conf/: `- optional local: overrides` in conf/config.yaml's defaults
GROUP = "benchmark"  # the one config group: an override of it chooses a preset
_HEADER = (
    "# @package _global_\n# Written by python -m stages.compose (the overrides it was given); --reset removes it.\n"
)


def conf_dir(params_path: Path) -> Path:
    return params_path.parent / CONF


def compose_text(conf: Path, overrides: Sequence[str] = ()) -> str:
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


def compose_data(conf: Path, overrides: Sequence[str] = ()) -> dict[str, Any]:
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


class _Absent:
    def __repr__(self) -> str:
        return "absent"


ABSENT: Any = _Absent()  # a key on one side only (None is a value: `gate: null`)


def departures(data: dict, conf: Path) -> dict[str, tuple[Any, Any]]:
    """key -> (value in `data`, value conf/ composes) wherever they differ; ABSENT stands for a key the side
    does not have. Read by the `params` stage, which notes each (a hand edit, or an experiment's override)."""
    here, there = flatten(data), flatten(compose_data(conf))
    found = {key: (here.get(key, ABSENT), there.get(key, ABSENT)) for key in {**here, **there}}
    return {key: pair for key, pair in found.items() if pair[0] != pair[1]}


def _kept_overrides(text: str | None, overrides: Sequence[str]) -> str:
    """conf/local/overrides.yaml's text (`text`: what it keeps now, if anything) with `overrides` merged in: a
    preset choice becomes an `override /benchmark` of the defaults list, a value its key's nested entry."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    kept = yaml.safe_load(text) if text else None
    kept = kept if isinstance(kept, dict) else {}
    try:
        parsed = OverridesParser.create().parse_overrides(list(overrides))
    except HydraException as error:
        raise ParamsError(f"overrides {' '.join(overrides)}: {' '.join(str(error).split())}") from None
    for override in parsed:
        if override.is_add() or override.is_delete() or override.is_force_add():
            raise ParamsError(f"override {override.input_line!r}: only key=value is kept (no +, ++ or ~)")
        if override.key_or_group == GROUP:
            kept["defaults"] = [{f"override /{GROUP}": override.value()}]
            continue
        node = kept
        *parents, leaf = override.key_or_group.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = override.value()
    defaults = kept.pop("defaults", None)
    ordered = {**({"defaults": defaults} if defaults else {}), **kept}
    return _HEADER + yaml.safe_dump(ordered, sort_keys=False)


def compose_params(path: Path, overrides: Sequence[str] = (), reset: bool = False) -> str:
    """Compose `path` from its conf/. `overrides` are first merged into conf/local/overrides.yaml (`reset`
    removes that file first); the composition is validated before anything is written."""
    conf = conf_dir(path)
    kept = conf / KEPT
    before = kept.read_text(encoding="utf-8") if kept.is_file() else None
    start = None if reset else before
    after = _kept_overrides(start, overrides) if overrides else start
    try:
        _write_or_remove(kept, after)
        text = compose_text(conf)
        parse_params(yaml.safe_load(text), f"{conf}/ composed{' with ' + ' '.join(overrides) if overrides else ''}")
    except ParamsError:
        _write_or_remove(kept, before)  # a bad override is not kept
        raise
    if not path.is_file() or path.read_text(encoding="utf-8") != text:
        with atomic_path(path) as temporary:
            temporary.write_text(text, encoding="utf-8")
    return text


def _write_or_remove(path: Path, text: str | None) -> None:
    if text is None:
        if path.is_file() and path.read_text(encoding="utf-8").startswith(_HEADER):  # never a file it did not write
            path.unlink()
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as temporary:
        temporary.write_text(text, encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. benchmark=embedded-classil retrieval.k=8")
    parser.add_argument("--params", default="params.yaml", type=Path, help="the file to write (default: params.yaml)")
    parser.add_argument("--reset", action="store_true", help=f"remove conf/{KEPT} (the kept overrides) first")
    args = parser.parse_args()
    try:
        data = yaml.safe_load(compose_params(args.params, args.overrides, args.reset))
    except (ParamsError, OSError) as error:
        sys.exit(f"error: {error}")
    kept = conf_dir(args.params) / KEPT
    keeping = f"; overrides kept in {kept}" if kept.is_file() else ""
    print(f"{args.params}: composed from {conf_dir(args.params)}/ ({data['benchmark']['preset']}){keeping}")


if __name__ == "__main__":
    main()

"""Every stage declares exactly the code it runs: DVC (and the flow's cache keys, built from the same lists)
re-run a stage when a file its imports reach changes, and only then."""

import ast
import re
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO

# Read at run time rather than imported: declared beside the module that reads them.
DATA_READ_BY = {"moder/clip.py": "moder/model_configs", "moder/datasets/__init__.py": "moder/datasets/catalog"}
# Packages whose modules are imported by name at run time (importlib), invisible to an import scan: such a
# package is a dependency as a whole (the dataset adapters).
BY_NAME = {"moder/datasets/__init__.py": "moder/datasets"}
STAGES = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
NOT_CODE = ("data/", "params.yaml", "conf")  # outputs of other stages, the params file and its sources


def _module_file(name: str) -> Path | None:
    path = REPO.joinpath(*name.split("."))
    for candidate in (path / "__init__.py", path.with_suffix(".py")):
        if candidate.is_file():
            return candidate
    return None


def _imported_names(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):  # every import, also inside functions
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
    return names


def imported_files(start: Path, packages: tuple[str, ...] = ("moder", "stages", "flows")) -> set[str]:
    """`start` and every project module it imports, transitively (packages include their __init__)."""
    seen, todo = set(), [start]
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        for name in _imported_names(path):
            parts = name.split(".")
            if parts[0] in packages:
                todo += [f for i in range(1, len(parts) + 1) if (f := _module_file(".".join(parts[:i])))]
    return {p.relative_to(REPO).as_posix() for p in seen}


def needed(module: str) -> set[str]:
    """What a stage module's run reads of the project: the files its imports reach, the data files those read,
    and whole the packages it imports modules of by name."""
    files = imported_files(_module_file(module))
    whole = {BY_NAME[f] for f in files if f in BY_NAME}
    files |= {DATA_READ_BY[f] for f in files if f in DATA_READ_BY}
    return {f for f in files if not any(f.startswith(f"{d}/") for d in whole)} | whole


def code_deps(spec: dict) -> set[str]:
    return {d for d in spec["deps"] if not d.startswith(NOT_CODE)}


def mismatch(spec: dict) -> str:
    """'' when the stage's code deps are exactly what its module needs, else what is missing and extra."""
    module = re.search(r"python -m (stages\.\w+)", spec["cmd"]).group(1)
    want, have = needed(module), code_deps(spec)
    missing, extra = sorted(want - have), sorted(have - want)
    return (f"missing {missing} " if missing else "") + (f"extra {extra}" if extra else "")


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_every_stage_lists_exactly_the_code_it_runs(stage):
    problem = mismatch(STAGES[stage].get("do", STAGES[stage]))
    assert not problem, f"dvc.yaml, stage {stage}: {problem}"


def test_the_dependency_check_fails_on_a_missing_or_an_extra_file():
    spec = dict(STAGES["backbone"])
    assert mismatch(spec) == ""
    assert (
        mismatch({**spec, "deps": [d for d in spec["deps"] if d != "moder/pretrain.py"]})
        == "missing ['moder/pretrain.py'] "
    )
    assert mismatch({**spec, "deps": [*spec["deps"], "moder/baselines.py"]}) == "extra ['moder/baselines.py']"


def test_the_import_scan_sees_transitive_and_function_level_imports():
    files = imported_files(REPO / "stages" / "finetune.py")
    assert {"stages/common.py", "moder/baselines.py", "moder/params.py", "moder/world.py", "moder/io.py"} <= files
    # pre-training reaches neither the dataset adapters nor training: editing those re-runs no pre-training
    backbone = needed("stages.backbone")
    assert not any(f.startswith("moder/datasets") for f in backbone) and "moder/train.py" not in backbone


def test_the_library_and_the_stages_import_nothing_of_the_flow():
    for package in ("moder", "stages"):
        for module in sorted((REPO / package).rglob("*.py")):
            reached = imported_files(module)
            assert not [f for f in reached if f.startswith("flows/")], f"{module} reaches {sorted(reached)}"


def test_the_params_schema_imports_nothing_of_the_library():
    assert imported_files(REPO / "moder" / "params.py") == {"moder/params.py"}

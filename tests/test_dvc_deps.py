"""Every stage declares the code it runs: DVC (and the Prefect cache keys, built from the same lists)
re-run a stage when any module it imports changes."""

import ast
import re
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO

# Read at run time rather than imported: declared beside the module that reads them.
DATA_READ_BY = {"moder/clip.py": "moder/model_configs", "moder/datasets/__init__.py": "moder/datasets/catalog"}
# Imported by name at run time (importlib), invisible to an import scan.
DYNAMIC = {"extract": ["moder/datasets/aircraft.py", "moder/datasets/csv_list.py", "moder/datasets/imagenet_r.py"]}
STAGES = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]


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


def imported_files(start: Path) -> set[str]:
    """`start` and every project module it imports, transitively (packages include their __init__)."""
    seen, todo = set(), [start]
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        for name in _imported_names(path):
            parts = name.split(".")
            if parts[0] in ("moder", "stages"):
                todo += [f for i in range(1, len(parts) + 1) if (f := _module_file(".".join(parts[:i])))]
    return {p.relative_to(REPO).as_posix() for p in seen}


def _covered(file: str, deps: list[str]) -> bool:
    return any(file == dep or file.startswith(dep.rstrip("/") + "/") for dep in deps)


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_every_module_a_stage_imports_is_among_its_deps(stage):
    spec = STAGES[stage].get("do", STAGES[stage])
    module = re.search(r"python -m (stages\.\w+)", spec["cmd"]).group(1)
    needed = imported_files(_module_file(module))
    needed |= {DATA_READ_BY[f] for f in needed if f in DATA_READ_BY} | set(DYNAMIC.get(stage, []))
    deps = [d for d in spec["deps"] if not d.startswith("data/")]
    missing = sorted(f for f in needed if not _covered(f, deps))
    assert not missing, f"{stage} imports {missing} but dvc.yaml does not list them among its deps"


def test_the_import_scan_sees_transitive_and_function_level_imports():
    files = imported_files(REPO / "stages" / "finetune.py")
    assert {"stages/common.py", "moder/baselines.py", "moder/params.py", "moder/world.py", "moder/io.py"} <= files
    # why each stage lists moder/ whole: its imports reach most of the package
    package = {p.relative_to(REPO).as_posix() for p in (REPO / "moder").rglob("*.py")}
    assert len(files & package) > len(package) / 2

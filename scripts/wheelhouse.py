"""Wheels for an offline machine that already has PyTorch (a lent GPU machine, a cluster node without a
package index): every distribution the stages need that the machine lacks, at this environment's versions,
for the machine's Python.

    # there:  python3 -m pip list --format=freeze > have.txt      (and bring have.txt here)
    python scripts/wheelhouse.py --have have.txt --python 3.12 --out .whl
    # there:  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
    #         PYTHONPATH=/tmp/site:. python3 benchmarks/mtil_scale.py --sequence mtil-order1 --device cuda

The set is the closure of the project's requirements (pyproject.toml's dependencies, and DVC and Hydra, which
read dvc.yaml and compose conf/) over this environment's installed metadata, with markers evaluated for the
machine, less what `--have` lists: its own versions stay, torch's above all, which match its CUDA. A
distribution published without a wheel (antlr4-python3-runtime, which Hydra needs) is built into one here.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, distribution, requires
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOTS = ("dvc", "hydra-core")  # beside moder's own dependencies: the stages read dvc.yaml and conf/ with them
MANYLINUX = [f"manylinux_2_{minor}_x86_64" for minor in range(17, 40)] + ["manylinux2014_x86_64", "linux_x86_64"]


def target_environment(python: str, system: str = "Linux") -> dict[str, str]:
    """PEP 508 marker values of a CPython `python` (e.g. "3.12") on x86-64 `system`."""
    return {
        "python_version": python,
        "python_full_version": f"{python}.0",
        "implementation_name": "cpython",
        "platform_python_implementation": "CPython",
        "platform_machine": "x86_64",
        "platform_system": system,
        "sys_platform": {"Linux": "linux", "Windows": "win32", "Darwin": "darwin"}[system],
        "os_name": "nt" if system == "Windows" else "posix",
        "extra": "",
    }


def requirement_closure(roots: list[str], have: set[str], environment: dict[str, str]) -> dict[str, str]:
    """Canonical name -> installed version of every distribution `roots` need, transitively, whose markers
    hold in `environment`, except those in `have` (canonical names) and what only they need."""
    versions: dict[str, str] = {}
    pending = [canonicalize_name(root) for root in roots]
    while pending:
        name = pending.pop()
        if name in versions or name in have:
            continue
        try:
            found = distribution(name)
        except PackageNotFoundError:
            raise SystemExit(f"error: {name} is needed but not installed here: run `make venv` first") from None
        versions[name] = found.version
        for line in found.requires or []:
            requirement = Requirement(line)
            if requirement.marker is None or requirement.marker.evaluate(environment):
                pending.append(canonicalize_name(requirement.name))
    return versions


def project_roots(environment: dict[str, str]) -> list[str]:
    """moder's own requirements that hold in `environment` (not its extras), and ROOTS."""
    own = [Requirement(line) for line in requires("moder") or []]
    return [r.name for r in own if r.marker is None or r.marker.evaluate(environment)] + list(ROOTS)


def read_have(path: Path) -> set[str]:
    """Canonical names of a `pip list --format=freeze` (or `pip freeze`) file, or of one name per line."""
    names: set[str] = set()
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.split("#")[0].strip()
        if line:
            names.add(canonicalize_name(line.split("==")[0].split(" @ ")[0]))
    return names


def download(pins: list[str], python: str, out: Path) -> None:
    """Wheels of `pins` for CPython `python` on manylinux x86-64 into `out`; a distribution with no such
    wheel is built into one from its source here (pure Python ones only work there)."""
    tag = "cp" + python.replace(".", "")
    platforms = [flag for platform in [*MANYLINUX, "any"] for flag in ("--platform", platform)]
    wheel_flags = ["--only-binary=:all:", "--python-version", python, "--implementation", "cp"]
    abis = ["--abi", tag, "--abi", "abi3", "--abi", "none"]
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    for pin in pins:  # one call each, so that one without a wheel does not fail the others
        fetched = subprocess.run(
            [*pip, "download", "--no-deps", *wheel_flags, *abis, *platforms, "-d", str(out), pin],
            capture_output=True,
            text=True,
        )
        if fetched.returncode != 0:
            print(f"{pin}: no wheel for CPython {python}; building one from its source")
            subprocess.run([*pip, "wheel", "--no-deps", "-w", str(out), pin], check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--have", type=Path, required=True, help="the machine's `pip list --format=freeze`")
    parser.add_argument("--python", default="3.12", help="the machine's Python version (default 3.12)")
    parser.add_argument("--out", type=Path, default=Path(".whl"), help="the folder for the wheels (default .whl)")
    args = parser.parse_args()
    if not args.have.is_file():
        sys.exit(f"error: {args.have} not found: write it on the machine with `python3 -m pip list --format=freeze`")
    environment = target_environment(args.python)
    versions = requirement_closure(project_roots(environment), read_have(args.have), environment)
    args.out.mkdir(parents=True, exist_ok=True)
    download([f"{name}=={version}" for name, version in sorted(versions.items())], args.python, args.out)
    size = sum(wheel.stat().st_size for wheel in args.out.glob("*.whl")) / 2**20
    print(f"{len(versions)} distributions for CPython {args.python} in {args.out} ({size:.1f} MiB)")


if __name__ == "__main__":
    main()

"""Thin command-line stages, one per DVC stage, around the moder library (dvc.yaml runs them)."""

import importlib.util
import sys

# `dvc repro` runs `python -m stages.<name>` with the first python on PATH: outside the project's
# environment that python dies on `import torch` with a bare traceback. Checked without importing.
_missing = [
    name for name in ("torch", "open_clip", "pyarrow", "pydantic", "yaml") if importlib.util.find_spec(name) is None
]
if _missing:
    sys.exit(
        f"error: {sys.executable} cannot import {', '.join(_missing)}: the stages need the project's environment. "
        'Run `make venv`, then PATH="$PWD/.venv/bin:$PATH" dvc repro (or make run)'
    )

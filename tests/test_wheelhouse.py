"""scripts/wheelhouse.py: which distributions an offline machine that has PyTorch needs carried to it."""

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from scripts.wheelhouse import project_roots, read_have, requirement_closure, target_environment  # noqa: E402

LINUX = target_environment("3.12")


def test_closure_follows_requirements_and_leaves_out_what_the_machine_has():
    needed = requirement_closure(project_roots(LINUX), {"torch", "torchvision", "numpy", "pyyaml"}, LINUX)
    # moder's own requirements, theirs (open_clip's ftfy, pydantic's core), and the pipeline's readers of dvc.yaml
    assert {"open-clip-torch", "ftfy", "pydantic", "pydantic-core", "torchcodec", "dvc", "hydra-core"} <= set(needed)
    assert "antlr4-python3-runtime" in needed  # Hydra's, published without a wheel: built by download()
    assert not {"torch", "torchvision", "numpy", "pyyaml"} & set(needed)
    assert not any(
        name.startswith("nvidia-") for name in needed
    )  # torch's CUDA libraries come with the machine's torch
    from importlib.metadata import version

    assert needed["open-clip-torch"] == version("open_clip_torch")  # this environment's (pinned) versions


def test_markers_are_those_of_the_machine():
    assert "colorama" not in requirement_closure(["typer"], set(), LINUX)  # typer needs it on Windows only
    assert "colorama" in requirement_closure(["typer"], set(), target_environment("3.12", "Windows"))


def test_have_file_takes_freeze_output_and_plain_names(tmp_path):
    have = tmp_path / "have.txt"
    have.write_text("torch==2.11.0+cu130\nPyYAML==6.0.2\n# a comment\n\nOpen_Clip_Torch\nsomething @ file:///x.whl\n")
    assert read_have(have) == {"torch", "pyyaml", "open-clip-torch", "something"}

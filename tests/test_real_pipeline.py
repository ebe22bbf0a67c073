"""The real-benchmark path end to end: image datasets in their on-disk layouts and a randomly initialised
open_clip architecture (ViT-S-32-alt: the real code path at a quarter of ViT-B-16's cost) given as a local
checkpoint, through every stage of dvc.yaml (in-process, as the flow runs them: DVC's own runs are checked on
the miniature project); and image datasets through `dvc repro`'s scan and extraction."""

import json

import pytest
import torch
import yaml
from safetensors.torch import save_file

from moder.clip import load_clip, save_backbone
from moder.datasets import DatasetNotFound, catalog, load_split
from moder.features import read_features
from moder.params import parse_params
from moder.results import METHODS
from stages.extract import extract
from tests.conftest import MINI, copy_code, dvc, full_params, run_command, run_pipeline, stale_stages, with_conf
from tests.layouts import imagefolder, mnist

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::UserWarning")]
ARCHITECTURE = "ViT-S-32-alt"


@pytest.fixture(scope="module")
def real_project(tmp_path_factory):
    """MTIL over an MNIST and an ImageFolder fixture on a random open_clip model saved as a plain state dict
    (as a user's local weights file would be), every stage of dvc.yaml run once."""
    weights = tmp_path_factory.mktemp("weights") / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in load_clip(ARCHITECTURE, seed=0).model.state_dict().items()}, str(weights))
    data = tmp_path_factory.mktemp("datasets")
    mnist.write(data / "mnist", n_classes=10, per_class=1)
    imagefolder.write(data / "shapes", n_classes=3, per_class=2)
    params = parse_params(
        with_conf(
            {
                "model": {
                    "architecture": ARCHITECTURE,
                    "pretrained": None,
                    "checkpoint": str(weights),
                    "cache_dir": None,
                    "device": "cpu",
                },
                "templates": ["a photo of a {}."],
                "extract": {
                    "train_per_class": 32,
                    "test_per_class": 32,
                    "batch_size": 8,
                    "workers": 0,
                    "decode": "workers",
                    "precision": "fp32",
                    "skip_bad_images": False,
                },
                "train": {"epochs": 1, "batch_size": 16},
                "benchmark": {"name": "tiny-real", "preset": "tiny-real", "protocol": "mtil"},
                "datasets": {
                    "shapes": {"source": "imagefolder", "root": str(data / "shapes")},
                    "mnist": {"source": "mnist", "root": str(data / "mnist")},
                },
                "tasks": {"shapes": {"dataset": "shapes"}, "mnist": {"dataset": "mnist"}},
            }
        )
    )
    root = tmp_path_factory.mktemp("project")
    return root, params, data, run_pipeline(params.model_dump(mode="json"), root)


def test_every_stage_runs_on_a_real_architecture_and_image_datasets(real_project):
    root, _, _, figures = real_project
    summary = json.loads((root / "reports" / "backbone.json").read_text())
    assert summary["architecture"] == ARCHITECTURE and summary["weights"].startswith("file:")
    assert set(figures) == {*METHODS, "composition", "calibration", "headroom", "hub"}
    assert figures["hub"]["classes"] == 3 + 10  # shapes and mnist


def test_features_carry_each_datasets_classes_and_templates(real_project):
    root, _, _, _ = real_project
    digits = read_features(root / "data/tiny-real/features/mnist/classes.parquet")
    assert digits.class_names == catalog("mnist").class_names
    assert digits.templates == tuple(catalog("mnist").templates)  # CLIP's MNIST template, not params.yaml's
    assert digits.vectors.shape == (10, 256)  # the architecture's embedding width
    shapes = read_features(root / "data/tiny-real/features/shapes/classes.parquet")
    assert shapes.class_names == ["blue circle", "blue cross", "blue diamond"]
    assert shapes.templates == ("a photo of a {}.",)  # an ImageFolder has no catalog: params.yaml's
    assert read_features(root / "data/tiny-real/features/shapes/test.parquet").labels.tolist() == [0, 0, 1, 1, 2, 2]


def test_extracted_features_equal_a_bare_forward_with_open_clip_preprocessing(real_project):
    root, params, data, _ = real_project
    clip = load_clip(ARCHITECTURE, checkpoint=params.model.checkpoint)
    split = load_split("mnist", data / "mnist", "test")
    images = torch.stack([clip.preprocess(split.read(item)) for item in split.images])
    with torch.no_grad():
        expected = torch.nn.functional.normalize(clip.model.encode_image(images), dim=-1)
    stored = read_features(root / "data/tiny-real/features/mnist/test.parquet")
    assert torch.allclose(stored.vectors, expected, atol=1e-5)
    assert stored.labels.tolist() == split.labels


def test_missing_dataset_fails_extract_naming_the_path_and_writes_nothing(real_project, tmp_path):
    root, params, _, _ = real_project
    data = params.model_dump(mode="json")
    data["datasets"]["mnist"]["root"] = str(tmp_path / "nowhere")
    with pytest.raises(DatasetNotFound, match=f"mnist: dataset root {tmp_path / 'nowhere'} does not exist"):
        extract(parse_params(data), "mnist", root / "data/backbone/clip.safetensors", tmp_path / "features" / "mnist")
    assert not (tmp_path / "features").exists() or not any((tmp_path / "features").iterdir())


def test_saved_backbone_keeps_the_tags_activation_and_preprocessing(tmp_path):
    """Weights trained with QuickGELU (OpenAI's) rebuilt from the saved backbone keep QuickGELU;
    open_clip alone would rebuild e.g. `ViT-B-16` with GELU from a bare file."""
    clip = load_clip("moder-micro-clip", seed=0)
    clip.quick_gelu = True
    save_backbone(clip, tmp_path / "clip.safetensors", "tag:test")
    rebuilt = load_clip("moder-micro-clip", checkpoint=tmp_path / "clip.safetensors")
    assert rebuilt.quick_gelu and type(rebuilt.model.transformer.resblocks[0].mlp.gelu).__name__ == "QuickGELU"
    assert rebuilt.identity.mean == clip.identity.mean


def test_a_changed_image_makes_only_its_datasets_extract_stale(tmp_path):
    """`scan` lists each dataset's files; extract@<dataset> depends on its own listing (through `dvc repro`, on
    the micro CLIP: the listing, not the model, is what this checks)."""
    data = tmp_path / "shapes"
    imagefolder.write(data, n_classes=3, per_class=2)
    params = {
        **MINI,
        "datasets": {**MINI["datasets"], "shapes": {"source": "imagefolder", "root": str(data)}},
        "tasks": {**MINI["tasks"], "shapes": {"dataset": "shapes"}},
    }
    root = copy_code(tmp_path / "project")
    (root / "params.yaml").write_text(yaml.safe_dump(full_params(params), sort_keys=False))
    run_command(["git", "init", "-q"], root)
    dvc(root, "init", "-q")
    dvc(root, "repro", "extract@shapes", "extract@a")
    image = sorted(data.rglob("*.png"))[0]
    original = image.read_bytes()
    image.write_bytes(original + b"\0")  # one more byte: another size, a new mtime
    dvc(root, "repro", "scan")
    assert stale_stages(root) >= {"extract@shapes"} and "extract@a" not in stale_stages(root)
    listing = json.loads((root / "data" / "mini-mtil" / "scans" / "shapes.json").read_text())
    assert listing["files"] == len(list(data.rglob("*.*"))) and listing["source"] == "imagefolder"
    image.write_bytes(original)
    dvc(root, "repro", "scan")
    assert "extract@shapes" in stale_stages(root)  # restored bytes, but a newer mtime: re-extract to be sure

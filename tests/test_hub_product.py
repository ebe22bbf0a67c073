"""The hub after the run: `moder classify`, `moder export-head`, `moder hub show` and the Classifier API
answer exactly as evaluation does, on the miniature run's outputs."""

import csv
import io
import json
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from moder.classifier import Classifier
from moder.cli import InputError, class_names
from moder.cli import main as cli_main
from moder.compose import seen_prototypes
from moder.experts import load_experts
from moder.factory import ExpertFactory
from moder.features import read_features
from moder.params import parse_params
from moder.world import World, render
from tests.conftest import DATA, MINI, MODEL, REPO, call_main


def _moder(*args: str) -> subprocess.CompletedProcess:
    """`moder ARGS`: moder.cli's main in this process (the first test runs the installed command itself)."""
    return call_main(cli_main, ["moder", *args], REPO)


def _moder_accuracy(root: Path, step: str, task: str) -> float:
    rows = pq.read_table(root / DATA / "eval" / f"{step}.parquet").to_pylist()
    return next(r["accuracy"] for r in rows if r["task"] == task and r["method"] == "moder")


def test_classify_on_a_task_not_yet_trained_gives_exactly_evaluations_accuracy(mtil_run, tmp_path):
    root, _ = mtil_run
    test = read_features(root / DATA / "features" / "b" / "test.parquet")
    names = test.class_names
    (tmp_path / "classes.txt").write_text("\n".join(names) + "\n")
    (tmp_path / "templates.txt").write_text("\n".join(MINI["templates"]) + "\n")
    moder_command = Path(sys.executable).parent / "moder"
    result = subprocess.run(
        [
            str(moder_command),
            "classify",
            "--backbone",
            str(root / MODEL),
            "--hub",
            str(root / DATA / "hub" / "a.parquet"),
            "--classes",
            str(tmp_path / "classes.txt"),
            "--templates",
            str(tmp_path / "templates.txt"),
            "--dataset",
            "b",
            "--top-k",
            "1",
            str(root / DATA / "features" / "b" / "test.parquet"),
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    right = [row["label_1"] == names[int(label)] for row, label in zip(rows, test.labels, strict=True)]
    # the same predictions: one image more or less right would move the figure by 100/15 points
    assert 100.0 * sum(right) / len(right) == pytest.approx(_moder_accuracy(root, "a", "b"), abs=1e-4)


def test_a_hub_class_gets_its_own_experts_prototype(mtil_run):
    root, _ = mtil_run
    classifier = Classifier.from_files(root / MODEL, root / DATA / "hub" / "b.parquet")
    experts, names, _, _ = load_experts(root / DATA / "experts" / "a" / "split-1.safetensors")
    factory = ExpertFactory(classifier.tower, parse_params(MINI).expert, MINI["templates"])
    zeroshot = read_features(root / DATA / "features" / "a" / "classes.parquet").vectors
    alpha = MINI["composition"]["alpha"]  # own experts smoothed toward zero-shot as evaluation smooths them
    own = seen_prototypes(classifier.tower, factory.prompts(names), experts, zeroshot, alpha)
    assert torch.allclose(classifier.prototypes(names, dataset="a"), own, atol=1e-6)
    composed = classifier.prototypes(names, dataset="b")  # the same names as if never trained
    assert not torch.allclose(composed, own, atol=1e-3)


def test_the_exported_head_predicts_as_predict_does(mtil_run, tmp_path):
    root, _ = mtil_run
    names = read_features(root / DATA / "features" / "b" / "classes.parquet").class_names
    result = _moder(
        "export-head",
        "--backbone",
        str(root / MODEL),
        "--hub",
        str(root / DATA / "hub" / "a.parquet"),
        "--classes",
        ",".join(names),
        "--out",
        str(tmp_path / "head.safetensors"),
    )
    assert result.returncode == 0, result.stderr
    with safe_open(str(tmp_path / "head.safetensors"), "pt") as head:
        weights, bias = head.get_tensor("weights"), head.get_tensor("bias")
        assert json.loads(head.metadata()["moder"])["class_names"] == names
    features = read_features(root / DATA / "features" / "b" / "test.parquet").vectors
    logits = torch.nn.functional.normalize(features, dim=-1) @ weights + bias
    classifier = Classifier.from_files(root / MODEL, root / DATA / "hub" / "a.parquet")
    prediction = classifier.predict(features, names, top_k=1)
    assert [names[i] for i in logits.argmax(dim=1)] == [labels[0] for labels in prediction.labels]


def test_classify_reads_image_folders_and_names_a_bad_image(mtil_run, tmp_path):
    root, _ = mtil_run
    params = parse_params(MINI)
    world = World.of(params.world, params.seed)
    images = render(world, params.datasets["b"], "b", torch.arange(3), torch.Generator().manual_seed(0))
    folder = tmp_path / "images"
    folder.mkdir()
    for i, image in enumerate(images):
        Image.fromarray((image.permute(1, 2, 0).numpy() * 255).round().astype("uint8")).save(folder / f"{i}.png")
    args = [
        "classify",
        "--backbone",
        str(root / MODEL),
        "--hub",
        str(root / DATA / "hub" / "b.parquet"),
        "--classes",
        "red circle,green square,blue star",
        "--top-k",
        "2",
    ]
    result = _moder(*args, "--out", str(tmp_path / "out.json"), str(folder))
    assert result.returncode == 0, result.stderr
    rows = json.loads((tmp_path / "out.json").read_text())
    assert [Path(row["image"]).name for row in rows] == ["0.png", "1.png", "2.png"]
    assert all(len(row["labels"]) == 2 and row["scores"][0] >= row["scores"][1] for row in rows)
    (folder / "3.png").write_bytes(b"\x89PNG not really")
    failed = _moder(*args, str(folder))
    last = failed.stderr.strip().splitlines()[-1]  # after the progress bar
    assert failed.returncode == 1 and "Traceback" not in failed.stderr, failed.stderr
    assert last.startswith(f"error: cannot decode image {folder / '3.png'}") and "--skip-bad-images" in last
    # --top-k above the 3 classes: every class ranked, the CSV's header and rows alike (they were ragged)
    skipped = _moder(*args[:-1], "5", "--skip-bad-images", str(folder))
    assert skipped.returncode == 0 and "skipped 1 undecodable image(s)" in skipped.stderr
    table = list(csv.reader(io.StringIO(skipped.stdout)))
    assert table[0] == ["image", *[f"{kind}_{rank}" for rank in (1, 2, 3) for kind in ("label", "score")]]
    assert len(table) == 4 and {len(row) for row in table} == {7}


@pytest.mark.parametrize(
    "spec, message",
    [
        (",", "no class names"),
        ("red circle,red circle", "repeated class name(s): red circle"),
        ("missing.txt", "--classes missing.txt: no such file"),
        ("missing", "--classes missing: no such file; give a file with one name per line"),  # never one class
        ("x" * 300, f"--classes {'x' * 300}: not a readable text file"),  # too long a name for a file
    ],
)
def test_class_lists_that_cannot_be_read_are_refused_naming_them(spec, message):
    with pytest.raises(InputError) as error:
        class_names(spec)
    assert message in str(error.value)


def test_a_long_comma_separated_class_list_is_names_not_a_file():
    names = [f"class number {i}" for i in range(40)]  # over 255 characters
    assert class_names(",".join(names)) == names


@pytest.mark.parametrize(
    "change, message",
    [
        (["--classes", "red_circle,Red circle"], "class names collide"),
        (["--classes", "missing.txt"], "--classes missing.txt: no such file"),
        (["--hub", "nowhere/hub.parquet"], "hub index not found: nowhere/hub.parquet"),
    ],
)
def test_bad_input_is_one_line_naming_it(mtil_run, tmp_path, change, message):
    root, _ = mtil_run
    options = {"--backbone": str(root / MODEL), "--hub": str(root / DATA / "hub" / "a.parquet"), "--classes": "a,b"}
    options.update(dict(zip(change[::2], change[1::2], strict=True)))
    result = _moder(
        "classify", *[v for pair in options.items() for v in pair], str(root / DATA / "features" / "b" / "test.parquet")
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.startswith("error: ") and message in result.stderr


def test_a_hub_made_on_another_backbone_is_refused(mtil_run, tmp_path):
    root, _ = mtil_run
    from stages.backbone import backbone

    backbone(parse_params({**MINI, "seed": 1}), tmp_path / "other.safetensors", tmp_path / "other.json")
    result = _moder(
        "classify",
        "--backbone",
        str(tmp_path / "other.safetensors"),
        "--hub",
        str(root / DATA / "hub" / "a.parquet"),
        "--classes",
        "a,b",
        str(root / DATA / "features" / "b" / "test.parquet"),
    )
    assert result.returncode == 1 and "hub was built on backbone" in result.stderr


def test_hub_show_lists_the_classes_per_step_and_the_expert_size(mtil_run):
    root, _ = mtil_run
    result = _moder("hub", "show", str(root / DATA / "hub" / "b.parquet"))
    assert result.returncode == 0, result.stderr
    assert "9 classes, backbone moder-micro-clip" in result.stdout
    assert "step 1 a (a): 4 classes" in result.stdout and "step 2 b (b): 5 classes" in result.stdout
    assert "parameters" in result.stdout and '"kind": "lora"' in result.stdout

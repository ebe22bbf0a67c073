"""Faults, bad input and tampering on the miniature pipeline: each is refused with one line naming
what is at fault, and nothing outside the stage's own outputs changes (docs/reliability.md)."""

import csv
import errno
import hashlib
import io
import json
import os
import shutil
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import yaml

from moder.clip import ModelLoadError, load_clip
from moder.errors import TrainingDiverged
from moder.experts import ExpertFileError, load_experts
from moder.features import FeatureFileError, FeatureTable, write_features
from moder.io import OWNER_FILE, OutputError, atomic_directory, atomic_path
from moder.names import PromptError
from moder.params import parse_params
from moder.prompts import template_prompts
from moder.tensors import TensorFileError
from stages.evaluate import evaluate
from stages.finetune import finetune
from stages.report import report
from stages.train import train
from tests.conftest import DATA, MINI, MODEL, REPO, stage_cli


def snapshot(root: Path) -> dict[str, str]:
    """Every file under `root` by path -> sha256, to prove a failure changed nothing."""
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture
def run(mtil_run, tmp_path):
    """A private copy of the miniature run's outputs, safe to damage."""
    root, _ = mtil_run
    copy = tmp_path / "run"
    shutil.copytree(root / DATA, copy)  # the benchmark's outputs at the top: features/, experts/, ...
    for path in (MODEL.parent, Path("reports")):
        shutil.copytree(root / path, copy / path)
    shutil.copy(root / "metrics.json", copy / "metrics.json")
    (copy / "params.yaml").write_text(yaml.safe_dump(MINI))  # as _cli writes it, so snapshots compare
    return copy


def _cli(stage: str, cwd: Path, *args: str, params: dict = MINI) -> subprocess.CompletedProcess:
    return stage_cli(stage, params, cwd, *args)


def _one_line_error(result: subprocess.CompletedProcess, *expected: str) -> None:
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for text in expected:
        assert text in lines[0], lines[0]


# --- outputs only where the stage owns them ------------------------------------------------------


def test_extract_refuses_an_out_that_holds_other_outputs(run):
    before = snapshot(run)
    result = _cli("extract", run, "--dataset", "a", "--model", str(run / MODEL), "--out", str(run / "features"))
    _one_line_error(result, f"refusing to replace {run / 'features'}: it is not empty and was not written by extract")
    assert snapshot(run) == before


def test_an_out_of_dot_is_refused_and_the_directory_kept(run):
    before = snapshot(run)
    result = _cli("train", run, "--dataset", "a", "--model", str(run / MODEL), "--features", "features", "--out", ".")
    _one_line_error(result, "refusing to replace .: it is not empty and was not written by train")
    assert snapshot(run) == before


def test_a_stage_replaces_its_own_earlier_output(run):
    (run / "experts" / "a" / "stale.txt").write_text("left by an earlier run of train@a")
    train(parse_params(MINI), "a", run / MODEL, run / "features", run / "experts" / "a")
    assert sorted(p.name for p in (run / "experts" / "a").iterdir()) == [OWNER_FILE, "split-1.safetensors"]


def test_file_outputs_must_have_their_suffix(run):
    result = _cli(
        "evaluate",
        run,
        "--step",
        "a",
        "--model",
        str(run / MODEL),
        "--features",
        "features",
        "--experts",
        "experts",
        "--out",
        "params.yaml",
        "--unseen-out",
        "u.parquet",
    )
    assert result.returncode == 2 and "argument --out: 'params.yaml' is not a .parquet file" in result.stderr
    with pytest.raises(OutputError, match="refusing to write the file .*features: a directory is there"):
        with atomic_path(run / "features"):
            pass


def test_temporaries_of_a_killed_write_are_hidden_from_dvc_and_cleaned_by_the_next_write(tmp_path):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    leftover = tmp_path / f".out.{gone.pid}-0badc0de.tmp"
    leftover.mkdir()
    (leftover / "half.parquet").write_bytes(b"half")
    mine = tmp_path / f".out.{os.getpid()}-00000000.tmp"  # a live process's write in progress
    mine.mkdir()
    assert ".*.tmp" in (REPO / ".dvcignore").read_text().splitlines()
    with atomic_directory(tmp_path / "out", owner="test") as directory:
        (directory / "x").write_text("x")
    assert not leftover.exists() and mine.exists() and (tmp_path / "out" / "x").read_text() == "x"


def test_outputs_respect_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        with atomic_path(tmp_path / "f.json") as temporary:
            temporary.write_text("{}")
        with atomic_directory(tmp_path / "d", owner="test") as directory:
            (directory / "x").write_text("x")
    finally:
        os.umask(old)
    assert (tmp_path / "f.json").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "d").stat().st_mode & 0o777 == 0o755


def test_a_full_disk_names_the_output_and_keeps_the_old_one(run, monkeypatch):
    before = (run / "finetune.parquet").read_bytes()

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("pyarrow.parquet.write_table", full)
    with pytest.raises(OutputError, match=r"could not write .*finetune.parquet: No space left on device"):
        finetune(parse_params(MINI), run / MODEL, run / "features", run / "finetune.parquet")
    assert (run / "finetune.parquet").read_bytes() == before
    assert not [p for p in run.iterdir() if p.name.endswith(".tmp")]


def test_report_replaces_all_its_outputs_together(run, monkeypatch):
    before = snapshot(run / "reports") | {"metrics.json": snapshot(run)["metrics.json"]}
    written = []
    original = Path.write_text

    def fail_on_the_fourth(self, text, *args, **kwargs):
        written.append(self)
        if len(written) == 4:
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(self, text, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", fail_on_the_fourth)
    with pytest.raises(OutputError, match="No space left on device"):
        report(
            parse_params({**MINI, "seed": 1}),
            run / "eval",
            run / "finetune.parquet",
            run / "unseen",
            run / "hub",
            run / "experts",
            run / "metrics.json",
            run / "reports",
        )
    assert snapshot(run / "reports") | {"metrics.json": snapshot(run)["metrics.json"]} == before


# --- finite or refused ---------------------------------------------------------------------------


def test_a_diverging_training_fails_and_writes_nothing(run):
    shutil.rmtree(run / "experts" / "a")
    diverging = {**MINI, "train": {**MINI["train"], "lr": 1e6}}
    with pytest.raises(TrainingDiverged, match=r"training diverged: the loss is nan at step \d+ \(lr 1000000.0\)"):
        train(parse_params(diverging), "a", run / MODEL, run / "features", run / "experts" / "a")
    assert not (run / "experts" / "a").exists() and not [p for p in (run / "experts").iterdir() if ".tmp" in p.name]


def _overwrite(path: Path, offset_from_end: int, data: bytes) -> None:
    raw = bytearray(path.read_bytes())
    raw[len(raw) - offset_from_end : len(raw) - offset_from_end + len(data)] = data
    path.write_bytes(bytes(raw))


def _header(path: Path) -> tuple[int, dict]:
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    return length, json.loads(raw[8 : 8 + length])


def _rewrite_metadata(path: Path, edit) -> None:
    """Change the JSON metadata inside a safetensors header, keeping the file otherwise valid."""
    raw = path.read_bytes()
    length, header = _header(path)
    inner = json.loads(header["__metadata__"]["moder"])
    edit(inner)
    header["__metadata__"]["moder"] = json.dumps(inner, sort_keys=True)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + length :])


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda p: _overwrite(p, 64, bytes(range(64))), "its contents do not match their digest"),
        (lambda p: p.write_bytes(p.read_bytes()[:200]), "not a readable safetensors file"),
        (lambda p: p.write_bytes(b"garbage" * 10), "not a readable safetensors file"),
        (
            lambda p: _rewrite_metadata(p, lambda m: m["extra"].update(offsets=[1e308] * len(m["class_names"]))),
            "its contents do not match their digest",
        ),
    ],
)
def test_damaged_experts_are_refused_naming_the_file_and_its_stage(run, damage, message):
    path = run / "experts" / "b" / "split-1.safetensors"
    damage(path)
    before = snapshot(run)
    with pytest.raises(ExpertFileError) as error:
        evaluate(
            parse_params(MINI),
            "a",
            run / MODEL,
            run / "features",
            run / "experts",
            run / "hub" / "a.parquet",
            run / "eval" / "a.parquet",
            run / "unseen" / "a.parquet",
        )
    assert str(path) in str(error.value) and message in str(error.value)
    assert "[written by train@b: re-run it" in str(error.value) and "\n" not in str(error.value)
    assert snapshot(run) == before


def test_malformed_metadata_json_is_named(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "x.safetensors"
    save_file({"ctx": torch.zeros(1, 2, 3)}, str(path), metadata={"moder": "{not json"})
    with pytest.raises(ExpertFileError, match=r"x.safetensors: its metadata is not valid JSON"):
        load_experts(path)


def test_tensors_with_shapes_that_do_not_fit_are_refused(tmp_path):
    from moder.tensors import save_tensors

    path = tmp_path / "e.safetensors"
    description = {"experts": {"kind": "context", "n_ctx": 3}, "backbone": "model", "extra": {}}
    save_tensors(path, {"ctx": torch.zeros(2, 3, 4)}, {**description, "class_names": ["a", "b", "c"]})
    with pytest.raises(
        ExpertFileError, match=r"e.safetensors: expected one ctx tensor \[3, n_ctx, width\], got ctx \[2, 3, 4\]"
    ):
        load_experts(path)
    lora = {"lora_a.0.attn_in": torch.zeros(2, 2, 4), "lora_b.0.attn_in": torch.zeros(2, 12, 3)}
    save_tensors(path, lora, {**description, "experts": {"kind": "lora", "scaling": 1.0}, "class_names": ["a", "b"]})
    with pytest.raises(
        ExpertFileError, match=r"LoRA target 0.attn_in: A \[2, 2, 4\] and B \[2, 12, 3\] are not rank-matched"
    ):
        load_experts(path)


def test_non_finite_values_are_never_written(tmp_path):
    with pytest.raises(TensorFileError, match=r"refusing to write .*t.safetensors: tensor w has non-finite values"):
        from moder.tensors import save_tensors

        save_tensors(tmp_path / "t.safetensors", {"w": torch.tensor([1.0, float("inf")])}, {})
    with pytest.raises(FeatureFileError, match=r"refusing to write .*f.parquet: the d features have non-finite values"):
        write_features(
            tmp_path / "f.parquet",
            FeatureTable(torch.tensor([[float("nan"), 1.0]]), torch.tensor([0]), ["x"], "d", "m"),
        )
    assert list(tmp_path.iterdir()) == []


def test_a_damaged_backbone_is_refused_naming_it(run):
    path = run / MODEL
    _rewrite_metadata(path, lambda m: m["backbone"]["preprocess"].update(mean=[1e308, 0, 0]))
    with pytest.raises(ModelLoadError, match=rf"{path}: its contents do not match their digest"):
        load_clip("moder-micro-clip", checkpoint=path)
    result = _cli("extract", run, "--dataset", "a", "--model", str(path), "--out", str(run / "new"))
    _one_line_error(result, str(path), "do not match their digest")


@pytest.mark.parametrize(
    "change, message",
    [
        (
            lambda t: t.replace_schema_metadata({**t.schema.metadata, b"moder.dataset": b"b"}),
            "holds features of dataset 'b', not 'a'",
        ),
        (
            lambda t: t.set_column(0, "label", __import__("pyarrow").array([99] * t.num_rows, "int32")),
            "label 99 is outside its 4 classes",
        ),
    ],
)
def test_features_for_another_dataset_or_with_labels_out_of_range_are_refused(run, change, message):
    import pyarrow.parquet as pq

    path = run / "features" / "a" / "train.parquet"
    pq.write_table(change(pq.read_table(path)), path)
    with pytest.raises(FeatureFileError) as error:
        train(parse_params(MINI), "a", run / MODEL, run / "features", run / "experts" / "a")
    assert str(path) in str(error.value) and message in str(error.value) and "written by extract@a" in str(error.value)


def test_prototype_rows_must_match_the_class_list(run):
    import pyarrow.parquet as pq

    path = run / "features" / "a" / "classes.parquet"
    pq.write_table(pq.read_table(path).slice(0, 3), path)
    with pytest.raises(FeatureFileError, match="3 prototype rows do not match its 4 classes one to one"):
        train(parse_params(MINI), "a", run / MODEL, run / "features", run / "experts" / "a")


def test_a_cuda_device_without_cuda_is_blamed_on_the_device(run):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    result = _cli(
        "extract",
        run,
        "--dataset",
        "a",
        "--model",
        str(run / MODEL),
        "--out",
        str(run / "new"),
        params={**MINI, "model": {**MINI["model"], "device": "cuda"}},
    )
    _one_line_error(result, "model.device is 'cuda' but this machine has no CUDA device")


# --- names and templates -------------------------------------------------------------------------


def test_colliding_class_names_are_refused_naming_them(tower):
    with pytest.raises(PromptError, match=r"'red_circle'/'Red  circle'.*same prototype"):
        template_prompts(tower, ["red_circle", "blue star", "Red  circle"], ["a photo of a {}."])


def test_a_name_cut_by_the_context_length_is_refused(tower):
    long = "very " * 80 + "red circle"
    with pytest.raises(PromptError, match=r"1 prompt\(s\) longer than the text encoder's 77 tokens"):
        template_prompts(tower, ["blue star", long], ["a photo of a {}."])


def test_a_template_that_does_not_insert_the_name_is_refused(tower):
    with pytest.raises(PromptError, match=r"template 'a photo of \{\{\}\}' does not insert the class name once"):
        template_prompts(tower, ["red circle", "blue star"], ["a photo of {{}}"])


# --- reports ------------------------------------------------------------------------------------


def test_class_names_with_commas_quotes_and_newlines_stay_one_csv_field(run):
    import pyarrow.parquet as pq

    path = run / "unseen" / "a.parquet"
    table = pq.read_table(path)
    odd = ['red, "bright"\ncircle'] * table.num_rows
    pq.write_table(
        table.set_column(table.schema.get_field_index("class_name"), "class_name", __import__("pyarrow").array(odd)),
        path,
    )
    report(
        parse_params(MINI),
        run / "eval",
        run / "finetune.parquet",
        run / "unseen",
        run / "hub",
        run / "experts",
        run / "metrics.json",
        run / "reports",
    )
    rows = list(csv.reader(io.StringIO((run / "reports" / "unseen_classes.csv").read_text())))
    assert {len(row) for row in rows} == {9} and rows[1][2] == odd[0]


# --- deterministic under concurrency -------------------------------------------------------------


def test_concurrent_training_gives_the_bytes_of_sequential_training(mtil_run, tmp_path):
    """Prefect runs stages in a thread pool: nothing one thread does may change another's numerics."""
    root, _ = mtil_run
    params = parse_params(MINI)

    def jobs(out: Path):
        return [
            lambda d=d: train(params, d, root / MODEL, root / DATA / "features", out / "experts" / d)
            for d in ("a", "b")
        ] + [lambda: finetune(params, root / MODEL, root / DATA / "features", out / "finetune.parquet")]

    for job in jobs(tmp_path / "sequential"):
        job()
    threads = [threading.Thread(target=job) for job in jobs(tmp_path / "threads")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert snapshot(tmp_path / "threads") == snapshot(tmp_path / "sequential")
    assert snapshot(tmp_path / "sequential")["finetune.parquet"] == snapshot(root / DATA)["finetune.parquet"]
    assert not torch.are_deterministic_algorithms_enabled()  # no process-global switch was flipped on


# --- what the store, the exchange with DVC and the command lines must refuse ------------------------------------


def test_a_restored_record_may_hold_only_its_stages_outputs():
    """A store writer can substitute a self-consistent record; `flows.exchange restore` still places nothing
    outside the outputs dvc.yaml gives the record's stage instance, nor an incomplete set of them."""
    from flows.exchange import check_outputs
    from flows.graph import pipeline
    from flows.store import ArtifactRecord, StoreError
    from tests.conftest import FULL

    call = pipeline(REPO / "dvc.yaml", FULL)["backbone"]
    digest = "0" * 64
    check_outputs(ArtifactRecord.of({"data/backbone/clip.safetensors": digest, "reports/backbone.json": digest}), call)
    foreign = {"data/backbone/clip.safetensors": digest, "reports/backbone.json": digest, "metrics.json": digest}
    with pytest.raises(
        StoreError, match="record of backbone holds metrics.json, not an output of it: nothing restored"
    ):
        check_outputs(ArtifactRecord.of(foreign), call)
    with pytest.raises(StoreError, match="record of backbone lacks its output reports/backbone.json"):
        check_outputs(ArtifactRecord.of({"data/backbone/clip.safetensors": digest}), call)


def test_a_full_disk_while_writing_safetensors_names_the_file_and_leaves_nothing(tmp_path, monkeypatch):
    from safetensors import SafetensorError

    import moder.tensors

    def full(*args, **kwargs):
        raise SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull })")

    monkeypatch.setattr(moder.tensors, "save_file", full)
    target = tmp_path / "experts" / "split-1.safetensors"
    with pytest.raises(OutputError, match=rf"could not write {target}: Error while serializing: .*StorageFull"):
        moder.tensors.save_tensors(target, {"w": torch.ones(2)}, {})
    assert [p.name for p in tmp_path.rglob("*") if p.is_file()] == []


def test_features_that_are_finite_but_not_unit_vectors_are_refused(tmp_path):
    """Four flipped bytes can make a float32 of 3.4e38: finite, but no L2-normalised row holds it."""
    from moder.features import read_features

    vectors = torch.nn.functional.normalize(torch.randn(3, 4, generator=torch.Generator().manual_seed(0)), dim=-1)
    vectors[1, 2] = 3.4e38
    write_features(tmp_path / "f.parquet", FeatureTable(vectors, torch.tensor([0, 1, 1]), ["a", "b"], "d", "m"))
    with pytest.raises(FeatureFileError, match=r"f.parquet: 1 feature rows are not unit vectors \(norms 3.4e\+38"):
        read_features(tmp_path / "f.parquet")


def test_settings_only_the_model_can_refuse_fail_in_the_params_stage():
    from moder.params import ParamsError
    from stages.check_params import check_model

    check_model(parse_params(MINI))
    bad = parse_params({**MINI, "expert": {**MINI["expert"], "lora": {**MINI["expert"]["lora"], "layers": [-1, 99]}}})
    with pytest.raises(ParamsError, match=r"expert.lora.layers: \[99\] outside the 2 text layers of moder-micro-clip"):
        check_model(bad)


def test_damaged_evaluation_outputs_give_one_line_naming_the_file(run):
    from stages.common import MissingInput
    from stages.report import read_matrices, summary_text

    params = parse_params(MINI)
    rows = run / "eval" / "b.parquet"
    rows.write_bytes(rows.read_bytes()[:-4] + b"JUNK")  # the footer's magic bytes gone
    with pytest.raises(
        MissingInput, match=rf"{rows}: not a readable Parquet file .*\[written by evaluate@b: re-run it\]"
    ):
        read_matrices(params, run / "eval", run / "finetune.parquet")
    (run / "metrics.json").write_text('{"moder": {"transfer": 1')  # truncated
    with pytest.raises(MissingInput, match=r"metrics.json: not readable JSON"):
        summary_text(params, run / "reports", run / "metrics.json")


def test_a_stage_whose_starter_is_killed_stops_instead_of_running_on(tmp_path):
    """`dvc repro` killed (not its process group): the stage it started gets SIGTERM (stages.common)."""
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(MINI))
    stage = (
        "import argparse, time; from stages.common import run_cli; "
        f"run_cli(lambda args, params: time.sleep(60), argparse.Namespace(params={str(tmp_path / 'params.yaml')!r}))"
    )
    starter = (
        "import subprocess, sys, time; "
        f"child = subprocess.Popen([sys.executable, '-c', {stage!r}], cwd={str(REPO)!r}); "
        "print(child.pid, flush=True); time.sleep(60)"
    )
    parent = subprocess.Popen([sys.executable, "-c", starter], cwd=REPO, stdout=subprocess.PIPE, text=True)
    child = int(parent.stdout.readline())
    time.sleep(3)  # the child's imports done and its request in place
    parent.kill()
    parent.wait()
    for _ in range(100):
        try:  # gone, or dead and not yet reaped by whoever adopted it
            if Path(f"/proc/{child}/stat").read_text().split(")")[-1].split()[0] == "Z":
                return
        except FileNotFoundError:
            return
        time.sleep(0.1)
    os.kill(child, 9)
    pytest.fail("the stage ran on after the process that started it was killed")

import contextlib
import copy
import importlib
import io
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from unittest import mock

import pytest
import torch
import yaml
from filelock import FileLock

from moder.clip import load_clip
from moder.factory import ExpertFactory
from moder.params import EvaluationSettings, ExpertParams, TrainParams
from moder.text import TextTower

# Tests run torch on one thread, and so do the processes they start: `make test` runs two workers on two cores
# (two threads each would contend), and CPU float results depend on the thread count, so a DVC run, a flow run
# and an in-process run of the same settings give the same bytes.
os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = "1"
torch.set_num_threads(1)

# The slow tier's files in the order they are handed to `make test`'s workers: the DVC project's first (it builds
# the project), the flow's last (it copies the project, built by then).
SLOW_FILES = ("test_dvc_pipeline.py", "test_real_pipeline.py", "test_flow.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The slow tier first, in SLOW_FILES order: `make test`'s two workers take whole files in collection order,
    so the longest start at once and the quick ones fill in around them."""

    def rank(item: pytest.Item) -> int:
        name = item.path.name
        return SLOW_FILES.index(name) if name in SLOW_FILES else len(SLOW_FILES)

    items.sort(key=rank)  # stable: each file's own order is kept


TEMPLATES = ["a photo of a {}.", "a drawing of a {}."]
CLASSES = ["red circle", "green square", "blue star", "yellow triangle", "purple hexagon"]


@pytest.fixture(scope="session")
def clip():
    return load_clip("moder-micro-clip", seed=0)


@pytest.fixture(scope="session")
def tower(clip):
    return TextTower(clip.model, clip.tokenizer)


def random_lora(factory: ExpertFactory, n: int, seed: int = 0):
    """LoRA experts with non-zero B, so that every expert really changes the encoder."""
    generator = torch.Generator().manual_seed(seed)
    experts = factory.new(n, generator)
    for target, b in experts.b.items():
        experts.b[target] = torch.randn(b.shape, generator=generator) * 0.2
    return experts


@pytest.fixture(scope="session")
def lora_factory(tower):
    return ExpertFactory(tower, expert_params({"kind": "lora", "lora": {"rank": 2, "alpha": 4.0}}), TEMPLATES)


@pytest.fixture(scope="session")
def context_factory(tower):
    return ExpertFactory(tower, expert_params({"kind": "context"}), TEMPLATES)


def merged_lora_model(model, experts, rows, weights):
    """A copy of `model` whose text weights absorb sum_j weights[j] * scaling * B[rows[j]] @ A[rows[j]]."""
    merged = copy.deepcopy(model)
    with torch.no_grad():
        for target in experts.a:
            layer, module = target.split(".")
            weight, _ = TextTower.linear_weight(merged.transformer.resblocks[int(layer)], module)
            for row, w in zip(rows, weights, strict=True):
                weight += w * experts.scaling * experts.b[target][row] @ experts.a[target][row]
    return merged


REPO = Path(__file__).resolve().parents[1]


def merged(base: dict, changes: dict) -> dict:
    """`base` with `changes` merged in: mappings key by key, lists and values replaced."""
    return {
        **base,
        **{
            k: merged(base[k], v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
            for k, v in changes.items()
        },
    }


# conf/config.yaml, the one home of every setting's value: the committed method settings
CONF = {k: v for k, v in yaml.safe_load((REPO / "conf" / "config.yaml").read_text()).items() if k != "defaults"}


def expert_params(changes: dict) -> ExpertParams:
    """conf/config.yaml's expert section with `changes`."""
    return ExpertParams.model_validate(merged(CONF["expert"], changes))


def evaluation_settings(protocol: str = "mtil", **changes: object) -> EvaluationSettings:
    """conf/config.yaml's retrieval and composition, each named setting changed (k, temperature, null_score,
    gate go to retrieval; space, alpha, alpha_unseen, calibrate to composition)."""
    retrieval = {k: v for k, v in changes.items() if k in CONF["retrieval"]}
    composition = {k: v for k, v in changes.items() if k in CONF["composition"]}
    assert set(changes) == set(retrieval) | set(composition), changes
    return EvaluationSettings(
        protocol=protocol,
        retrieval=merged(CONF["retrieval"], retrieval),
        composition=merged(CONF["composition"], composition),
    )


def train_params(**changes: object) -> TrainParams:
    """conf/config.yaml's train section with `changes`."""
    return TrainParams.model_validate(merged(CONF["train"], changes))


def with_conf(changes: dict) -> dict:
    """conf/config.yaml's settings with `changes` merged in (mappings key by key, lists and values replaced)."""
    return merged(CONF, changes)


# The committed method (expert, training objective, retrieval, composition, calibration) on a miniature world,
# model and budget: two epochs, three pre-training steps, a few images per class.
MINI = with_conf(
    {
        "model": {
            "architecture": "moder-micro-clip",
            "pretrained": None,
            "checkpoint": None,
            "cache_dir": None,
            "device": "cpu",
        },
        "pretrain": {"steps": 3, "batch_size": 8, "warmup": 1, "captions": ["a {}."]},
        "extract": {
            "train_per_class": 4,
            "test_per_class": 3,
            "batch_size": 16,
            "workers": 0,
            "decode": "workers",
            "precision": "fp32",
            "skip_bad_images": False,
        },
        "train": {"epochs": 2, "batch_size": 8},
        "benchmark": {"name": "mini-mtil", "preset": "mini-mtil", "protocol": "mtil"},
        "datasets": {"a": {"classes": 4, "tint": 0.2}, "b": {"classes": 5, "outline": 0.5}},
        "tasks": {"a": {"dataset": "a"}, "b": {"dataset": "b"}},
    }
) | {  # a world of 3 colours x 3 shapes, replacing conf/'s whole
    "world": {
        "image_size": 16,
        "colours": {"red": [0.9, 0.1, 0.1], "green": [0.1, 0.8, 0.2], "blue": [0.1, 0.2, 0.9]},
        "shapes": ["circle", "square", "star"],
    }
}
DATA = Path("data") / "mini-mtil"  # the miniature benchmark's outputs in a project (dvc.yaml's layout)
MODEL = Path("data") / "backbone" / "clip.safetensors"


def full_params(data: dict) -> dict:
    """Every key written out: DVC needs each param a stage declares to be present in params.yaml."""
    from moder.params import parse_params

    return parse_params(data).model_dump(mode="json")


PRESET_BLOCKS = ("model", "extract", "benchmark", "datasets", "tasks")  # what a file of conf/benchmark/ holds
# in the order Hydra composes conf/config.yaml and then the preset, so that params_text(FULL) is the composition
_PARSED = full_params(MINI)
FULL = {
    **{key: value for key, value in _PARSED.items() if key not in PRESET_BLOCKS},
    **{k: _PARSED[k] for k in PRESET_BLOCKS},
}


def params_text(data: dict) -> str:
    """`data` as params.yaml, written as Hydra's composition writes it (OmegaConf's YAML)."""
    from omegaconf import OmegaConf

    return OmegaConf.to_yaml(OmegaConf.create(data))


def run_command(args: list[str], cwd: Path, check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
    """`args` in `cwd` with the environment's tools first on PATH (and `env` added); fails the test unless it
    succeeds, when `check`."""
    path = f"{Path(sys.executable).parent}:{os.environ['PATH']}"
    env = {**os.environ, "PATH": path, "DVC_NO_ANALYTICS": "1", **(env or {})}
    result = subprocess.run(args, cwd=cwd, capture_output=True, text=True, env=env)
    assert not check or result.returncode == 0, f"{' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
    return result


def dvc(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return run_command([str(Path(sys.executable).parent / "dvc"), *args], cwd)


# every stage instance of the miniature project, as dvc.yaml names them
MINI_STAGES = frozenset(
    {"params", "scan", "backbone", "finetune", "report"}
    | {f"{stage}@{key}" for stage in ("extract", "train", "hub", "evaluate") for key in "ab"}
)
ALWAYS_RUN = {"scan"}  # always_changed in dvc.yaml: it lists the datasets' files at every repro


def stale_stages(cwd: Path) -> set[str]:
    """What `dvc status` says must re-run, besides the stages that always run."""
    return set(json.loads(dvc(cwd, "status", "--json").stdout)) - ALWAYS_RUN


def ran_stages(output: str) -> set[str]:
    """The stages a `dvc repro` / `dvc exp run` output says it ran."""
    return {line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage")}


def copy_code(root: Path) -> Path:
    """The pipeline's code (dvc.yaml, conf, moder, stages, flows) copied into `root`, a new project directory."""
    root.mkdir(parents=True, exist_ok=True)
    for name in ("dvc.yaml", "conf", "moder", "stages", "flows"):
        source = REPO / name
        (
            shutil.copytree(source, root / name, ignore=shutil.ignore_patterns("__pycache__"))
            if source.is_dir()
            else shutil.copy(source, root / name)
        )
    return root


def write_conf(root: Path, data: dict, variants: dict[str, dict] | None = None) -> None:
    """conf/ as the repository lays it out: `data` split into conf/config.yaml and the preset it names,
    plus one more preset per variant (name -> its datasets)."""
    preset = data["benchmark"]["preset"]
    presets = {preset: {key: data[key] for key in PRESET_BLOCKS}}
    for name, datasets in (variants or {}).items():
        presets[name] = {**presets[preset], "benchmark": {**data["benchmark"], "preset": name}, "datasets": datasets}
    (root / "conf" / "benchmark").mkdir(parents=True, exist_ok=True)
    general = {key: value for key, value in data.items() if key not in PRESET_BLOCKS}
    (root / "conf" / "config.yaml").write_text(
        yaml.safe_dump(
            {"defaults": ["_self_", {"benchmark": preset}, {"optional local": "overrides"}], **general}, sort_keys=False
        )
    )
    for name, blocks in presets.items():
        text = "# @package _global_\n" + yaml.safe_dump(blocks, sort_keys=False)
        (root / "conf" / "benchmark" / f"{name}.yaml").write_text(text)


# A second preset of the same benchmark (same data directory, as MTIL's two orders are): dataset b shifted
# otherwise, so that switching to it re-runs what reads dataset b and no more.
MINI_B = {**FULL["datasets"], "b": {**FULL["datasets"]["b"], "outline": 0.2}}


@pytest.fixture(scope="session")
def project(tmp_path_factory, worker_id):
    """A copy of the code with the miniature params composed from conf/ (DVC's Hydra composition on, as in
    the repository), run once through `dvc repro` and committed. Built once per test run: under `make test`'s
    workers the first to need it builds it, the other waits and copies it (each worker changes its own copy)."""
    shared = tmp_path_factory.getbasetemp()
    shared = shared.parent if worker_id != "master" else shared  # the run's directory, common to its workers
    built = shared / "project-built"
    with FileLock(f"{built}.lock"):
        if not (built / ".repro-output").is_file():
            _build_project(built)
    root = tmp_path_factory.mktemp("project")
    shutil.copytree(built, root, symlinks=True, dirs_exist_ok=True)
    output = (root / ".repro-output").read_text()
    return root, subprocess.CompletedProcess(["dvc", "repro"], 0, output, "")


def _build_project(root: Path) -> None:
    copy_code(root)
    (root / ".gitignore").write_text("/data/\n__pycache__/\n/.repro-output\n")
    write_conf(root, FULL, {"mini-mtil-b": MINI_B})
    run_command([sys.executable, "-m", "stages.compose"], root)
    assert (root / "params.yaml").read_text() == params_text(FULL)
    run_command(["git", "init", "-q"], root)
    run_command(["git", "config", "user.email", "test@example.com"], root)
    run_command(["git", "config", "user.name", "test"], root)
    dvc(root, "init", "-q")
    dvc(root, "config", "hydra.enabled", "true")
    shutil.copytree(REPO / ".dvc" / "plots", root / ".dvc" / "plots")
    repro = dvc(root, "repro")
    run_command(["git", "add", "-A"], root)
    run_command(["git", "commit", "-qm", "mini run"], root)
    (root / ".repro-output").write_text(repro.stdout)  # last: its presence says the project is complete


def run_pipeline(data: dict, root: Path) -> dict:
    """Every stage of dvc.yaml in order, in this process (flows/runner.py), `root` as the project; the metrics."""
    from flows.graph import pipeline
    from flows.runner import run_call
    from moder.params import parse_params

    params = parse_params(data)
    for call in pipeline(REPO / "dvc.yaml", params.model_dump(mode="json")).values():
        run_call(call, params, root)
    return json.loads((root / "metrics.json").read_text())


@pytest.fixture(scope="session")
def mtil_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("mtil")
    return root, run_pipeline(MINI, root)


def call_main(main: Callable[[], object], argv: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """`main()` as a command line `argv` in `cwd` would run it, in this process (a Python start that imports torch
    and open_clip costs seconds here): its exit status, stdout and stderr as the process would give them."""
    out, err = io.StringIO(), io.StringIO()
    previous = Path.cwd()
    status: object = 0
    with mock.patch.object(sys, "argv", argv), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        os.chdir(cwd)
        try:
            main()
        except SystemExit as exit_:
            status = exit_.code
        finally:
            os.chdir(previous)
    if status is not None and not isinstance(status, int):  # sys.exit("message"): Python prints it, status 1
        err.write(f"{status}\n")
        status = 1
    return subprocess.CompletedProcess(argv, status or 0, out.getvalue(), err.getvalue())


def stage_cli(stage: str, params: dict, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    """`python -m stages.<stage> ARGS` in `cwd` with `params` as its params.yaml: the module's own main() in this
    process (the stages run as processes under `dvc repro` in test_dvc_pipeline)."""
    (cwd / "params.yaml").write_text(yaml.safe_dump(params))
    module = importlib.import_module(f"stages.{stage}")
    return call_main(module.main, [f"stages/{stage}.py", *args], cwd)

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from moder.params import ParamsError, load_params, parse_params
from stages.check_params import departure_notes
from stages.compose import compose_data, compose_params, compose_text


def test_repository_params_are_valid():
    params = load_params("params.yaml")
    assert params.seed == 0 and params.expert.kind in ("context", "lora")


BENCHMARK = {"datasets": {"a": {"classes": 4}}, "tasks": {"a": {"dataset": "a"}}}


def test_defaults_fill_missing_sections():
    params = parse_params({"seed": 3, **BENCHMARK})
    assert params.retrieval.k == 16 and params.train.config(params.seed).seed == 3


def test_the_schema_defaults_are_the_committed_params():
    """One home for every default: a section deleted from params.yaml falls back to the same values."""
    committed = load_params("params.yaml")
    defaults = parse_params({"datasets": committed.model_dump()["datasets"], "tasks": committed.model_dump()["tasks"]})
    assert defaults == committed


def test_a_params_file_without_the_benchmark_is_refused():
    with pytest.raises(ParamsError, match="key 'datasets': Field required"):
        parse_params({"seed": 0})


@pytest.mark.parametrize(
    "data, message",
    [
        ({"retrieval": {"k": 0}}, "key 'retrieval.k': Input should be greater than or equal to 1 (got 0)"),
        ({"expert": {"kind": "adapter"}}, "key 'expert.kind': Input should be 'context' or 'lora' (got 'adapter')"),
        ({"composition": {"space": "weights"}}, "Input should be 'parameter' or 'output'"),
        ({"learning_rate": 1}, "unknown key 'learning_rate'; allowed keys: seed, templates, model"),
        ({"expert": {"lora": {"rnk": 2}}}, "unknown key 'expert.lora.rnk'; allowed keys: rank, alpha, layers, modules"),
        ({"expert": {"lora": {"modules": ["qkv"]}}}, "'attn_in', 'attn_out', 'mlp_fc' or 'mlp_proj' (got 'qkv')"),
        ({"templates": ["a photo"]}, "template 'a photo' does not insert the class name once"),
        ({"templates": ["a photo of {{}}"]}, "template 'a photo of {{}}' does not insert the class name once"),
        ({"templates": ["a {0} of a {0}"]}, "does not insert the class name once"),
        ({"templates": ["a photo of a {name}"]}, "does not insert the class name once"),
        ({"pretrain": {"captions": ["a {}", "no slot"]}}, "template 'no slot' does not insert"),
        ({"train": {"lr": float("nan")}}, "key 'train.lr': Input should be a finite number"),
        ({"retrieval": {"temperature": float("inf")}}, "key 'retrieval.temperature': Input should be a finite number"),
        ({"model": {"device": "banana"}}, "key 'model.device': unknown device 'banana'"),
        (
            {"benchmark": {"name": "../../escape"}},
            "key 'benchmark.name': benchmark name '../../escape' becomes a directory",
        ),
        ({"datasets": {"a/b": {"classes": 4}}}, "datasets key 'a/b' becomes a directory name"),
        ({"tasks": {"..": {"dataset": "a"}}}, "tasks key '..' becomes a directory name"),
        ({"model": {"pretrained": "openai", "checkpoint": "w.pt"}}, "either pretrained"),
        ({"seed": -1}, "key 'seed'"),
        ([1, 2], "expected a mapping"),
    ],
)
def test_bad_params_name_the_key(data, message):
    with pytest.raises(ParamsError) as error:
        parse_params(data, "params.yaml")
    assert message in str(error.value)
    assert str(error.value).startswith("params.yaml")


def test_bad_files(tmp_path):
    with pytest.raises(ParamsError, match="params file not found: .*missing.yaml"):
        load_params(tmp_path / "missing.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("seed: [1\n")
    with pytest.raises(ParamsError, match="broken.yaml: not valid YAML"):
        load_params(broken)
    latin = tmp_path / "latin.yaml"
    latin.write_bytes("seed: 0  # caf\xe9\n".encode("latin-1"))
    with pytest.raises(ParamsError, match=r"latin.yaml: not UTF-8 text \(byte 14"):
        load_params(latin)


CONF = Path("conf")
PRESETS = sorted(path.stem for path in (CONF / "benchmark").glob("*.yaml"))


def test_params_yaml_is_conf_composed_as_dvc_exp_run_composes_it(tmp_path):
    from dvc.utils.hydra import compose_and_dump

    assert compose_text(CONF, []) == Path("params.yaml").read_text()
    dumped = tmp_path / "params.yaml"
    compose_and_dump(dumped, str(CONF.resolve()), None, "config", str(tmp_path), ["benchmark=embedded-classil"])
    assert compose_text(CONF, ["benchmark=embedded-classil"]) == dumped.read_text()


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_composes_valid_params_and_names_itself(preset):
    params = parse_params(compose_data(CONF, [f"benchmark={preset}"]), preset)
    assert params.benchmark.preset == preset


def _edited_project(tmp_path: Path) -> Path:
    """A project directory with the repository's conf/ and params.yaml, retrieval.k edited by hand to 5."""
    shutil.copytree(CONF, tmp_path / "conf")
    target = tmp_path / "params.yaml"
    target.write_text(Path("params.yaml").read_text().replace("\n  k: 16\n", "\n  k: 5\n", 1))
    return target


def test_compose_switches_the_preset_and_refuses_to_drop_a_hand_edit(tmp_path):
    target = _edited_project(tmp_path)
    edited = target.read_text()
    with pytest.raises(ParamsError) as error:
        compose_params(target, ["benchmark=embedded-classil"])
    assert str(error.value) == (
        f"{target} holds values {tmp_path / 'conf'}/ does not, which composing would drop: retrieval.k=5; "
        f"put them in {tmp_path / 'conf'}/, give them again as overrides, or pass --discard"
    )
    assert target.read_text() == edited  # nothing written
    compose_params(target, ["benchmark=embedded-classil", "retrieval.k=5"])
    params = load_params(target)
    assert params.benchmark.preset == "embedded-classil" and list(params.tasks) == [f"paint-{i}" for i in (1, 2, 3, 4)]
    assert params.retrieval.k == 5
    compose_params(target, ["benchmark=embedded-mtil", "retrieval.k=5"])
    assert target.read_text() == edited  # the same edit, the same file: nothing else was lost
    compose_params(target, [], discard=True)
    assert target.read_text() == Path("params.yaml").read_text()


def test_compose_keeps_the_preset_in_use_and_takes_edits_of_conf(tmp_path):
    target = _edited_project(tmp_path)
    (tmp_path / ".dvc").mkdir()  # a DVC project: the last composition is kept in .dvc/tmp/
    compose_params(target, ["benchmark=embedded-classil", "retrieval.k=5"])
    config = tmp_path / "conf" / "config.yaml"
    for gate in (0.9, 0.8):  # conf/ edited twice, composed after each edit: nothing edited params.yaml
        config.write_text(re.sub(r"\n  gate: \S+", f"\n  gate: {gate}", config.read_text(), count=1))
        compose_params(target, [])
        params = load_params(target)
        assert params.benchmark.preset == "embedded-classil" and params.retrieval.gate == gate
    assert params.retrieval.k == 16  # the override was not repeated: conf/'s value
    target.write_text(target.read_text().replace("\n  k: 16\n", "\n  k: 7\n", 1))
    with pytest.raises(ParamsError, match="would drop: retrieval.k=7;"):
        compose_params(target, [])  # edited since: the edit is kept


def test_a_fresh_clone_takes_edits_of_conf(tmp_path):
    """The committed params.yaml is a composition nobody edited: `make run` after editing conf/ composes it."""
    target = _edited_project(tmp_path)
    target.write_text(Path("params.yaml").read_text())
    for command in (
        ["init", "-q"],
        ["add", "params.yaml"],
        ["-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "c"],
    ):
        subprocess.run(["git", *command], cwd=tmp_path, check=True)
    config = tmp_path / "conf" / "config.yaml"
    config.write_text(config.read_text().replace("\n  gate: null", "\n  gate: 0.9", 1))
    compose_params(target, [])
    assert load_params(target).retrieval.gate == 0.9


def test_compose_errors_name_the_preset_or_key(tmp_path):
    target = _edited_project(tmp_path)
    with pytest.raises(
        ParamsError,
        match=r"with benchmark=nope: In 'config': Could not find 'benchmark/nope' "
        r"Available options in 'benchmark': classil-cifar100 .* mtil-order2$",
    ):
        compose_params(target, ["benchmark=nope"])
    with pytest.raises(ParamsError, match="Could not override 'retrieval.kk'"):
        compose_params(target, ["retrieval.kk=3"], discard=True)
    with pytest.raises(ParamsError, match=r"key 'retrieval.k': Input should be greater than or equal to 1 \(got 0\)"):
        compose_params(target, ["retrieval.k=0"], discard=True)
    with pytest.raises(ParamsError, match="conf/config.yaml not found"):
        compose_params(tmp_path / "elsewhere" / "params.yaml", [])


def test_check_params_names_each_departure_from_conf(tmp_path):
    target = _edited_project(tmp_path)
    assert departure_notes(target) == [
        f"note: {target}: retrieval.k = 5, {tmp_path / 'conf'}/ composes 16 (an override of this run or an edit; "
        f"`dvc exp run` rewrites {target} from {tmp_path / 'conf'}/)"
    ]
    assert departure_notes(Path("params.yaml")) == []
    (tmp_path / "alone").mkdir()
    shutil.copy(target, tmp_path / "alone" / "params.yaml")
    assert departure_notes(tmp_path / "alone" / "params.yaml") == []  # no conf/ beside it: nothing to compare


@pytest.mark.parametrize(
    "change, message",
    [
        ({"benchmark": {"protocol": "classil"}}, "classil splits one dataset into tasks; the tasks use ['a', 'b']"),
        ({"tasks": {"a": {"dataset": "a"}, "b": {"dataset": "a"}}}, "split 1 of dataset 'a' is already another task"),
        ({"tasks": {"a": {"dataset": "a", "split": 2}}}, "tasks.a.split: 2 but datasets.a.splits is 1"),
        ({"world": {"shapes": ["circle", "blob"]}}, "key 'world.shapes.1'"),
        ({"world": {"colours": {"red": [1.5, 0, 0], "blue": [0, 0, 1]}}}, "colour 'red' needs RGB values in [0, 1]"),
        (
            {"datasets": {"a": {"classes": 65}, "b": {"classes": 4}}},
            "datasets.a.classes: classes 1..65 asked of a world of 64 classes (8 colours x 8 shapes)",
        ),
        (
            {"datasets": {"a": {"classes": 12, "class_offset": 60}, "b": {"classes": 4}}},
            "datasets.a.class_offset: classes 61..72 asked of a world of 64 classes",
        ),
        ({"datasets": {"a": {"class_offset": 3}, "b": {}}}, "class_offset takes a range of `classes` classes"),
        (
            {"datasets": {"a": {"source": "imagefolder", "root": "x", "class_offset": 0}, "b": {}}},
            "class_offset: only for source embedded",
        ),
    ],
)
def test_benchmark_block_errors_name_the_key(change, message):
    base = {
        "datasets": {"a": {"classes": 4}, "b": {"classes": 4}},
        "tasks": {"a": {"dataset": "a"}, "b": {"dataset": "b"}},
    }
    with pytest.raises(ParamsError) as error:
        parse_params({**base, **change})
    assert message in str(error.value)

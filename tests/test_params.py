import copy
import re
import shutil
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel

from moder.params import DomainParams, Params, ParamsError, load_params, parse_params
from stages.check_params import departure_notes
from stages.compose import compose_data, compose_params, compose_text


def test_repository_params_are_valid():
    params = load_params("params.yaml")
    assert params.seed == 0 and params.expert.kind in ("context", "lora")


COMMITTED = yaml.safe_load(Path("params.yaml").read_text())


def _with(changes: dict) -> dict:
    """The committed params with `changes` merged in (mappings key by key, everything else replaced)."""

    def merged(base: dict, update: dict) -> dict:
        return {
            **base,
            **{
                k: merged(base[k], v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
                for k, v in update.items()
            },
        }

    return merged(copy.deepcopy(COMMITTED), changes)


def test_conf_is_the_one_home_of_every_value():
    """The schema holds types and bounds, no default: each value conf/config.yaml sets, taken away from the
    composed params, is a missing key named in the error (a dataset's shifts, optional by nature, aside)."""
    conf = {k: v for k, v in yaml.safe_load(Path("conf/config.yaml").read_text()).items() if k != "defaults"}

    def settings(model: type[BaseModel], data: dict, prefix: str = "") -> list[str]:
        """The keys of `data` that are settings of `model` (a section's fields, not the entries of a mapping)."""
        keys = []
        for name in data:
            annotation = model.model_fields[name].annotation
            if isinstance(annotation, type) and issubclass(annotation, BaseModel) and data[name]:
                keys += settings(annotation, data[name], f"{prefix}{name}.")
            else:
                keys.append(f"{prefix}{name}")
        return keys

    for key in settings(Params, conf):
        if key == "generated":
            continue
        data = _with({})
        *parents, leaf = key.split(".")
        node = data
        for part in parents:
            node = node[part]
        del node[leaf]
        with pytest.raises(ParamsError, match=rf"missing key '{re.escape(key)}' \(conf/ sets every key"):
            parse_params(data)
    assert load_params("params.yaml").pretrain.domain == DomainParams()  # conf/ says: the clean domain


def test_a_params_file_without_the_benchmark_is_refused():
    data = _with({})
    del data["datasets"]
    with pytest.raises(ParamsError, match="missing key 'datasets'"):
        parse_params(data)


def test_booleans_are_not_numbers_and_a_key_given_twice_is_refused(tmp_path):
    with pytest.raises(ParamsError, match=r"key 'train.epochs': Input should be a valid integer \(got True\)"):
        parse_params(_with({"train": {"epochs": True}}))
    with pytest.raises(ParamsError, match=r"key 'retrieval.temperature': Input should be a valid number"):
        parse_params(_with({"retrieval": {"temperature": False}}))
    assert parse_params(_with({"train": {"lr": 1}})).train.lr == 1.0  # an integer is a float
    twice = tmp_path / "params.yaml"
    twice.write_text(
        Path("params.yaml").read_text().replace("\nretrieval:\n  k: 4\n", "\nretrieval:\n  k: 4\n  k: 8\n")
    )
    with pytest.raises(
        ParamsError, match=r"params.yaml: not valid YAML: key 'k' is given twice in one mapping .* line 3\d"
    ):
        load_params(twice)


@pytest.mark.parametrize(
    "data, message",
    [
        ({"retrieval": {"k": 0}}, "key 'retrieval.k': Input should be greater than or equal to 1 (got 0)"),
        ({"expert": {"kind": "adapter"}}, "key 'expert.kind': Input should be 'context' or 'lora' (got 'adapter')"),
        ({"composition": {"space": "weights"}}, "Input should be 'parameter', 'output' or 'displacement'"),
        ({"learning_rate": 1}, "unknown key 'learning_rate'; allowed keys: generated, seed, templates, model"),
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
        ({"model": {"device": "cuda:x"}}, "key 'model.device': unknown device 'cuda:x'"),
        ({"benchmark": {"name": "backbone"}}, "data/backbone/ holds the backbone every benchmark shares"),
        ({"seed": -1}, "key 'seed'"),
        ([1, 2], "expected a mapping"),
    ],
)
def test_bad_params_name_the_key(data, message):
    with pytest.raises(ParamsError) as error:
        parse_params(_with(data) if isinstance(data, dict) else data, "params.yaml")
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


def _project(tmp_path: Path) -> Path:
    """A project directory with the repository's conf/ and params.yaml; its params.yaml path."""
    shutil.copytree(CONF, tmp_path / "conf", ignore=shutil.ignore_patterns("local"))
    shutil.copy("params.yaml", tmp_path / "params.yaml")
    return tmp_path / "params.yaml"


def test_params_yaml_says_it_is_generated_and_every_compose_rewrites_it(tmp_path):
    target = _project(tmp_path)
    assert target.read_text().startswith("generated: 'composed from conf/ (stages.compose, dvc exp run): edit conf/'\n")
    target.write_text(target.read_text().replace("\n  k: 4\n", "\n  k: 5\n", 1))  # a hand edit
    compose_params(target)
    assert target.read_text() == Path("params.yaml").read_text()  # conf/ is the one home: the edit is gone
    config = tmp_path / "conf" / "config.yaml"
    config.write_text(config.read_text().replace("\n  gate: null", "\n  gate: 0.9", 1))
    compose_params(target)
    assert load_params(target).retrieval.gate == 0.9


def test_overrides_given_to_compose_are_kept_in_conf_until_reset(tmp_path):
    target = _project(tmp_path)
    kept = tmp_path / "conf" / "local" / "overrides.yaml"
    compose_params(target, ["benchmark=embedded-classil", "retrieval.k=8"])
    params = load_params(target)
    assert params.benchmark.preset == "embedded-classil" and params.retrieval.k == 8
    compose_params(target)  # `make run` composes again: the overrides hold
    assert load_params(target).retrieval.k == 8 and load_params(target).benchmark.preset == "embedded-classil"
    compose_params(target, ["retrieval.temperature=0.1"])  # merged with those kept
    params = load_params(target)
    assert (params.retrieval.k, params.retrieval.temperature, params.benchmark.preset) == (8, 0.1, "embedded-classil")
    # DVC's own composition (what `dvc exp run` writes) composes the kept overrides too
    from dvc.utils.hydra import compose_and_dump

    dumped = tmp_path / "dumped.yaml"
    compose_and_dump(dumped, str((tmp_path / "conf").resolve()), None, "config", str(tmp_path), [])
    assert dumped.read_text() == target.read_text()
    compose_and_dump(dumped, str((tmp_path / "conf").resolve()), None, "config", str(tmp_path), ["retrieval.k=4"])
    assert yaml.safe_load(dumped.read_text())["retrieval"]["k"] == 4  # `-S` wins for its experiment
    compose_params(target, reset=True)
    assert not kept.exists() and target.read_text() == Path("params.yaml").read_text()


def test_compose_errors_name_the_preset_or_key_and_keep_nothing(tmp_path):
    target = _project(tmp_path)
    kept = tmp_path / "conf" / "local" / "overrides.yaml"
    with pytest.raises(
        ParamsError,
        match=r"Could not find 'benchmark/nope' Available options in 'benchmark': "
        r"classil-cifar100 .* mtil-order2-5shot$",
    ):
        compose_params(target, ["benchmark=nope"])
    with pytest.raises(ParamsError, match=r"key 'retrieval.k': Input should be greater than or equal to 1 \(got 0\)"):
        compose_params(target, ["retrieval.k=0"])
    with pytest.raises(ParamsError, match=r"override '\+extra=1': only key=value is kept"):
        compose_params(target, ["+extra=1"])
    assert not kept.exists() and target.read_text() == Path("params.yaml").read_text()  # nothing kept, nothing written
    with pytest.raises(ParamsError, match="conf/config.yaml not found"):
        compose_params(tmp_path / "elsewhere" / "params.yaml")


def test_check_params_names_each_departure_from_conf(tmp_path):
    target = _project(tmp_path)
    target.write_text(target.read_text().replace("\n  k: 4\n", "\n  k: 5\n", 1))
    assert departure_notes(target) == [
        f"note: {target}: retrieval.k = 5, {tmp_path / 'conf'}/ composes 4 (an override of this run or an edit; "
        f"the next compose rewrites {target} from {tmp_path / 'conf'}/)"
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
    two = {
        "datasets": {"a": {"classes": 4}, "b": {"classes": 4}},
        "tasks": {"a": {"dataset": "a"}, "b": {"dataset": "b"}},
    }
    data = _with({"benchmark": {"protocol": "mtil"}}) | two  # two datasets, one task each
    with pytest.raises(ParamsError) as error:
        parse_params({**data, **{k: v if k in two else _with(change)[k] for k, v in change.items()}})
    assert message in str(error.value)

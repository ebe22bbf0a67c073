import re
from pathlib import Path

import pytest

from moder.params import ParamsError, load_params, parse_params
from stages.use_benchmark import use_benchmark


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


def test_params_yaml_holds_the_embedded_mtil_preset_verbatim():
    text = Path("params.yaml").read_text()
    marker = "# Benchmark preset: configs/embedded-mtil.yaml\n"
    assert text[text.index(marker) + len(marker) :] == Path("configs/embedded-mtil.yaml").read_text()


def test_use_benchmark_swaps_the_block_and_keeps_the_rest(tmp_path):
    target = tmp_path / "params.yaml"
    edited = re.sub(r"\n  k: \d+\n", "\n  k: 5\n", Path("params.yaml").read_text(), count=1)
    target.write_text(edited)
    use_benchmark("embedded-classil", target, Path("configs"))
    params = load_params(target)
    assert params.benchmark.protocol == "classil" and list(params.tasks) == ["paint-1", "paint-2", "paint-3", "paint-4"]
    assert params.retrieval.k == 5  # the rest of the file is untouched
    use_benchmark("embedded-mtil", target, Path("configs"))
    assert target.read_text() == edited
    with pytest.raises(
        ParamsError,
        match="no benchmark preset configs/nope.yaml; presets: classil-cifar100, classil-cub200, classil-imagenet-r, "
        "embedded-classil, embedded-classil-few-tasks, embedded-classil-many-tasks, embedded-classil-sequential, "
        "embedded-mtil, embedded-mtil-novel, embedded-mtil-own-shifts, embedded-mtil-recurring, "
        "mtil-order1, mtil-order2",
    ):
        use_benchmark("nope", target, Path("configs"))


@pytest.mark.parametrize(
    "change, message",
    [
        ({"benchmark": {"protocol": "classil"}}, "classil splits one dataset into tasks; the tasks use ['a', 'b']"),
        ({"tasks": {"a": {"dataset": "a"}, "b": {"dataset": "a"}}}, "split 1 of dataset 'a' is already another task"),
        ({"tasks": {"a": {"dataset": "a", "split": 2}}}, "tasks.a.split: 2 but datasets.a.splits is 1"),
        ({"world": {"shapes": ["circle", "blob"]}}, "key 'world.shapes.1'"),
        ({"world": {"colours": {"red": [1.5, 0, 0], "blue": [0, 0, 1]}}}, "colour 'red' needs RGB values in [0, 1]"),
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

import pytest

from moder.params import ParamsError, load_params, parse_params


def test_repository_params_are_valid():
    params = load_params("params.yaml")
    assert params.seed == 0 and params.expert.kind in ("context", "lora")


def test_defaults_fill_missing_sections():
    params = parse_params({"seed": 3})
    assert params.retrieval.k == 3 and params.train.config(params.seed).seed == 3


@pytest.mark.parametrize(
    "data, message",
    [
        ({"retrieval": {"k": 0}}, "key 'retrieval.k': Input should be greater than or equal to 1 (got 0)"),
        ({"expert": {"kind": "adapter"}}, "key 'expert.kind': Input should be 'context' or 'lora' (got 'adapter')"),
        ({"composition": {"space": "weights"}}, "Input should be 'parameter' or 'output'"),
        ({"learning_rate": 1}, "unknown key 'learning_rate'; allowed keys: seed, templates, model"),
        ({"expert": {"lora": {"rnk": 2}}}, "unknown key 'expert.lora.rnk'; allowed keys: rank, alpha, layers, modules"),
        ({"expert": {"lora": {"modules": ["qkv"]}}}, "'attn_in', 'attn_out', 'mlp_fc' or 'mlp_proj' (got 'qkv')"),
        ({"templates": ["a photo"]}, "template 'a photo' has no '{}' slot"),
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

import pyarrow.parquet as pq
import pytest
import torch

from moder.features import FeatureFileError, FeatureTable, read_features, write_features


def _table(model="model-A"):
    generator = torch.Generator().manual_seed(0)
    return FeatureTable(
        torch.randn(6, 4, generator=generator),
        torch.tensor([0, 0, 1, 1, 2, 2]),
        ["red star", "blue ring", "green cross"],
        "studio",
        model,
    )


def test_round_trip_keeps_vectors_labels_classes_and_producer(tmp_path):
    table = _table()
    write_features(tmp_path / "f.parquet", table)
    back = read_features(tmp_path / "f.parquet", model="model-A")
    assert torch.equal(back.vectors, table.vectors) and torch.equal(back.labels, table.labels)
    assert (back.class_names, back.dataset, back.model) == (table.class_names, "studio", "model-A")
    metadata = pq.read_schema(tmp_path / "f.parquet").metadata
    assert metadata[b"moder.model"] == b"model-A"


def test_features_of_another_model_are_refused_naming_the_file(tmp_path):
    write_features(tmp_path / "f.parquet", _table("model-A"))
    with pytest.raises(
        FeatureFileError, match=r"f.parquet was made by another model:\n  file:     model-A\n  expected: model-B"
    ):
        read_features(tmp_path / "f.parquet", model="model-B")


def test_missing_and_foreign_files_name_the_path(tmp_path):
    with pytest.raises(FeatureFileError, match="feature file not found: .*nowhere.parquet"):
        read_features(tmp_path / "nowhere.parquet")
    (tmp_path / "junk.parquet").write_text("not parquet")
    with pytest.raises(FeatureFileError, match="junk.parquet: not a readable Parquet file"):
        read_features(tmp_path / "junk.parquet")
    pq.write_table(pq.read_table(_write(tmp_path)).replace_schema_metadata({}), tmp_path / "bare.parquet")
    with pytest.raises(FeatureFileError, match="bare.parquet: not a MoDER feature file"):
        read_features(tmp_path / "bare.parquet")


def _write(tmp_path):
    write_features(tmp_path / "ok.parquet", _table())
    return tmp_path / "ok.parquet"


def test_select_keeps_a_tasks_rows_labelled_by_position():
    vectors, labels = _table().select([2, 0])
    assert labels.tolist() == [1, 1, 0, 0]  # rows of class 0 then class 2, in file order
    assert torch.equal(vectors, _table().vectors[[0, 1, 4, 5]])

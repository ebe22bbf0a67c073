"""What separates the causes of a gain: new and recurring names, MoDER without composition or calibration,
and the share of the oracle's headroom, on hand-made inputs."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import TEMPLATES, evaluation_settings, random_lora

from moder.evaluation import (
    TrainedTask,
    accuracy_rows,
    evaluate_step,
    step_prototypes,
    trained_names,
)
from moder.hub import ExpertHub, HubEntry
from moder.metrics import headroom_share, transfer, transfer_over
from moder.prompts import zeroshot_prototypes
from moder.results import AccuracyRow, accuracy_matrices, effects, method_figures
from moder.tasks import Task, TaskData


def _task(step: int, dataset: str, names: list[str], features: torch.Tensor, labels: list[int], zeroshot) -> TaskData:
    return TaskData(
        Task(dataset, step, dataset, list(range(len(names)))), names, zeroshot, features, torch.tensor(labels)
    )


def test_a_name_trained_earlier_in_another_dataset_counts_as_recurring():
    eye = torch.eye(4)
    studio = _task(1, "studio", ["red star", "blue ring"], eye[:2], [0, 1], eye[:2])
    # fog: "Red  Star" is the studio class under another dataset (names compare normalised); "green cross" is new
    fog = _task(2, "fog", ["Red  Star", "green cross"], eye[[0, 0, 3, 2]], [0, 0, 1, 1], eye[[0, 3]])
    assert trained_names([studio, fog], 0) == {"red star", "blue ring"}
    prototypes = {("studio", "red star"): eye[0], ("studio", "blue ring"): eye[1]}
    prototypes |= {("fog", "Red  Star"): eye[0], ("fog", "green cross"): eye[2]}
    rows = accuracy_rows([studio, fog], 0, "mtil", "m", prototypes)
    # fog after step 0: its two "Red  Star" images right, of the two "green cross" images the one at eye[2]
    by_subset = {(r.task, r.names): (r.accuracy, r.n_test) for r in rows}
    assert by_subset == {
        ("studio", "all"): (100.0, 2),
        ("fog", "all"): (75.0, 4),
        ("fog", "recurring"): (100.0, 2),
        ("fog", "new"): (50.0, 2),
    }
    # after the last step nothing is untrained: one row per task, over all its images
    assert {(r.task, r.names) for r in accuracy_rows([studio, fog], 1, "mtil", "m", prototypes)} == {
        ("studio", "all"),
        ("fog", "all"),
    }


def test_transfer_over_a_subset_leaves_out_the_cells_it_has_no_image_in():
    nan = math.nan
    full = [[50.0, 20.0, 30.0], [60.0, 70.0, 40.0], [55.0, 65.0, 80.0]]
    assert transfer_over(full) == pytest.approx(transfer(full))
    # task 3 has no image of the subset after step 1: only step 2's cell counts in its column
    assert transfer_over([[50.0, 20.0, nan], [60.0, 70.0, 40.0], [55.0, 65.0, 80.0]]) == pytest.approx((20 + 40) / 2)
    # task 2 has none at all: the column is left out
    assert transfer_over([[1.0, nan, 30.0], [1.0, 1.0, 40.0], [1.0, 1.0, 1.0]]) == pytest.approx(35.0)
    assert transfer_over([[1.0, nan], [1.0, 1.0]]) is None


def test_headroom_share_on_a_hand_made_matrix():
    zeroshot = np.array([[40.0, 30.0, 20.0], [0, 50, 20.0], [0, 0, 50]])
    oracle = zeroshot + np.array([[10.0, 10.0, 10.0], [0, 10, 20.0], [0, 0, 10]])
    moder = zeroshot + np.array([[10.0, 2.0, 1.0], [0, 10, 5.0], [0, 0, 10]])
    bare = zeroshot + np.array([[10.0, 1.0, 0.0], [0, 10, 1.0], [0, 0, 10]])  # MoDER without composition
    # Transfer: zero-shot (30 + 20) / 2 = 25; oracle (40 + 35) / 2 = 37.5; MoDER (32 + 23) / 2 = 27.5;
    # without composition (31 + 20.5) / 2 = 25.75
    matrices = {(m, "all"): a for m, a in (("zeroshot", zeroshot), ("oracle", oracle), ("moder", moder))}
    matrices |= {("no_composition", "all"): bare, ("no_calibration", "all"): moder}
    figures = {m: method_figures(matrices, m, "mtil") for m in ("zeroshot", "oracle", "moder", "no_composition")}
    figures["no_calibration"] = figures["moder"]
    assert [figures[m]["transfer"] for m in ("zeroshot", "oracle", "moder", "no_composition")] == [
        25.0,
        37.5,
        27.5,
        25.75,
    ]
    found = effects(figures)
    assert found["headroom"] == {"moder": round(2.5 / 12.5, 3), "composition": round(1.75 / 11.75, 3)}
    assert found["composition"] == {"transfer": 1.75} and found["calibration"] == {"transfer": 0.0}
    assert headroom_share(30.0, 30.0, 30.0) is None and headroom_share(31.0, 30.0, 29.0) is None


def test_report_figures_carry_transfer_over_new_and_recurring_names_where_they_exist():
    rows = [
        AccuracyRow("a", "a", "m", 90.0, 4),
        AccuracyRow("a", "b", "m", 40.0, 4),
        AccuracyRow("a", "b", "m", 20.0, 2, "new"),
        AccuracyRow("a", "b", "m", 60.0, 2, "recurring"),
        AccuracyRow("b", "a", "m", 80.0, 4),
        AccuracyRow("b", "b", "m", 70.0, 4),
    ]
    matrices = accuracy_matrices(rows, ["a", "b"])
    assert method_figures(matrices, "m", "mtil") == {
        "transfer": 40.0,
        "avg": 70.0,
        "last": 75.0,
        "transfer_new": 20.0,
        "transfer_recurring": 60.0,
    }
    classil = method_figures(accuracy_matrices(rows[:2] + rows[4:], ["a", "b"]), "m", "classil")
    assert "transfer_new" not in classil and "transfer_recurring" not in classil and "future" in classil


@pytest.fixture(scope="module")
def two_steps(clip, tower, lora_factory):
    """Three one-dataset tasks; a hub of step 1's experts; every task's own prototypes from random experts."""
    names = [["red circle", "green square"], ["blue star", "red circle"], ["yellow triangle", "purple hexagon"]]
    experts = random_lora(lora_factory, 6, seed=5)
    generator = torch.Generator().manual_seed(2)
    sequence, trained = [], []
    for step, classes in enumerate(names, start=1):
        zeroshot = zeroshot_prototypes(tower, classes, TEMPLATES)
        features = F.normalize(zeroshot.repeat(3, 1) + 0.3 * torch.randn(6, zeroshot.shape[1], generator=generator))
        sequence.append(_task(step, f"d{step}", classes, features, [0, 1] * 3, zeroshot))
        own = F.normalize(zeroshot + 0.2 * torch.randn(zeroshot.shape, generator=generator), dim=-1)
        trained.append(TrainedTask(own, torch.tensor([0.01, 0.03])))
    hub = ExpertHub(clip.identity.to_json())
    entry = HubEntry(1, "d1", "d1", "d1/split-1.safetensors", (0.01, 0.03))
    hub.append(1, names[0], sequence[0].zeroshot, experts.select(torch.tensor([0, 1])), entry, trained[0].prototypes)
    return sequence, trained, hub


SETTINGS = evaluation_settings(k=2, temperature=0.3, alpha=0.8, alpha_unseen=0.5, calibrate="mean")


def test_moder_without_composition_keeps_zero_shot_for_untrained_classes_and_moder_for_trained(lora_factory, two_steps):
    sequence, trained, hub = two_steps
    prototypes = step_prototypes(lora_factory, sequence, trained, hub, 0, SETTINGS)
    untrained = [(d.task.dataset, n) for d in sequence[1:] for n in d.class_names]
    for key in untrained:
        assert torch.equal(prototypes.no_composition[key], prototypes.zeroshot[key])
        assert not torch.equal(prototypes.moder[key], prototypes.zeroshot[key])  # composed
    for key in [("d1", "red circle"), ("d1", "green square")]:
        assert torch.equal(prototypes.no_composition[key], prototypes.moder[key])
    assert set(prototypes.no_composition) == set(prototypes.moder)


def test_evaluation_scores_every_method_and_calibration_is_the_only_difference_of_no_calibration(
    lora_factory, two_steps
):
    sequence, trained, hub = two_steps
    evaluation = evaluate_step(lora_factory, sequence, trained, hub=hub, step=0, settings=SETTINGS)
    methods = {r.method for r in evaluation.rows}
    assert methods == {"zeroshot", "oracle", "moder", "no_composition", "no_calibration"}
    # task d2 holds "red circle", trained at step 1 under d1: recurring; "blue star" new
    assert {r.names for r in evaluation.rows if r.task == "d2"} == {"all", "new", "recurring"}
    assert {r.names for r in evaluation.rows if r.task == "d3"} == {"all", "new"}
    assert {(r.class_name, r.names) for r in evaluation.unseen_classes if r.task == "d2"} == {
        ("blue star", "new"),
        ("red circle", "recurring"),
    }
    # in MTIL a task's label space is its own dataset: the mean offset shifts every class alike
    by = {(r.method, r.task, r.names): r.accuracy for r in evaluation.rows}
    for key in [k for k in by if k[0] == "moder"]:
        assert by[key] == by[("no_calibration", *key[1:])]

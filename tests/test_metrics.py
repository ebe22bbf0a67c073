import pytest
import torch

from moder.metrics import accuracy, average, class_accuracy, future, label_space, last, summarize, transfer

# A[i][j]: rows are training steps, columns tasks.
A = [[50.0, 20.0, 30.0], [60.0, 70.0, 40.0], [55.0, 65.0, 80.0]]


def test_metrics_on_hand_computed_matrix():
    # transfer: j=2 -> A[1][2]=20; j=3 -> mean(30, 40)=35; mean(20, 35) = 27.5
    assert transfer(A) == pytest.approx(27.5)
    # avg: column means 55, 51.667, 50 -> 52.222
    assert average(A) == pytest.approx((55 + 155 / 3 + 50) / 3)
    assert last(A) == pytest.approx((55 + 65 + 80) / 3)
    # future: i=1 -> mean(20, 30)=25; i=2 -> 40; mean = 32.5
    assert future(A) == pytest.approx(32.5)


def test_summary_keys_per_protocol():
    assert set(summarize(A, "mtil")) == {"transfer", "avg", "last"}
    assert summarize(A, "classil")["future"] == pytest.approx(32.5)
    with pytest.raises(ValueError, match="allowed: mtil, classil"):
        summarize(A, "domain")


def test_transfer_and_future_differ_on_asymmetric_matrix():
    # transfer averages per column over earlier steps, future per row over later tasks
    B = [[0, 10, 100, 0], [0, 0, 20, 0], [0, 0, 0, 40], [0, 0, 0, 0]]
    assert transfer(B) == pytest.approx((10 + 60 + 40 / 3) / 3)
    assert future(B) == pytest.approx((110 / 3 + 10 + 40) / 3)


def test_bad_matrices_are_rejected():
    with pytest.raises(ValueError, match="square"):
        transfer([[1, 2, 3]])
    with pytest.raises(ValueError, match="at least two"):
        transfer([[1.0]])
    with pytest.raises(ValueError, match="NaN"):
        average([[1.0, float("nan")], [1.0, 1.0]])


def test_label_spaces():
    tasks = [["a", "b"], ["c"], ["d", "e"]]
    assert label_space("mtil", tasks, 0, 2) == ["d", "e"]
    assert label_space("classil", tasks, 0, 0) == ["a", "b"]
    assert label_space("classil", tasks, 1, 0) == ["a", "b", "c"]
    assert label_space("classil", tasks, 1, 1) == ["a", "b", "c"]
    assert label_space("classil", tasks, 1, 2) == ["a", "b", "c", "d", "e"]
    assert label_space("classil", tasks, 2, 2) == ["a", "b", "c", "d", "e"]
    with pytest.raises(ValueError, match="outside"):
        label_space("mtil", tasks, 3, 0)


def test_accuracy_percent():
    prototypes = torch.eye(3)
    features = torch.tensor([[1.0, 0.1, 0], [0, 0.2, 1.0], [0.9, 1.0, 0], [0, 0, 1.0]])
    assert accuracy(features, torch.tensor([0, 2, 0, 2]), prototypes) == 75.0


def test_class_accuracy_per_class_on_hand_made_features():
    prototypes = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    features = torch.tensor([[2.0, 0.1], [0.1, 3.0], [1.0, 0.2], [-1.0, 0.1]])
    labels = torch.tensor([0, 1, 1, 0])  # the 3rd and 4th are wrong
    assert class_accuracy(features, labels, prototypes)[:2].tolist() == [50.0, 50.0]
    assert torch.isnan(class_accuracy(features, labels, prototypes)[2])  # no feature of class 2
    assert accuracy(features, labels, prototypes) == 50.0


def test_offsets_are_subtracted_from_their_classes_scores():
    features = torch.tensor([[1.0, 0.9], [0.2, 1.0]])
    prototypes = torch.eye(2)
    labels = torch.tensor([1, 1])
    assert accuracy(features, labels, prototypes) == 50.0
    assert accuracy(features, labels, prototypes, torch.tensor([0.2, 0.0])) == 100.0
    assert class_accuracy(features, labels, prototypes, torch.tensor([0.2, 0.0])).tolist()[1] == 100.0

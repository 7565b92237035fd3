"""Hungarian-matched metrics on known confusions, evaluation of a run, and the exported dataset."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline import runner
from pipeline.errors import InputError
from pipeline.images import write_label_png
from stages.evaluate import accumulate, evaluate_workdir, scores
from stages.export import export_workdir
from tests.conftest import quiet, tiny_config


def _confusion(predicted, truth):
    confusion = np.zeros((256, 256), np.int64)
    accumulate(confusion, np.asarray(predicted, np.uint8), np.asarray(truth, np.uint8))
    return confusion


def test_a_permuted_perfect_prediction_scores_one():
    truth = np.array([[0, 0, 1, 1, 2, 2, 255]])
    predicted = np.array([[2, 2, 0, 0, 1, 1, 0]])  # ids permuted; the 255 pixel is not counted
    result = scores(_confusion(predicted, truth), num_predicted=3, num_classes=3)
    assert result["hungarian"]["miou"] == 1.0 and result["hungarian"]["pixel_accuracy"] == 1.0
    assert result["assignment"] == {"0": 1, "1": 2, "2": 0}


def test_known_ious_and_ignored_predictions_count_as_errors():
    truth = np.array([[0, 0, 0, 0, 1, 1, 1, 1]])
    predicted = np.array([[0, 0, 0, 1, 1, 1, 255, 255]])
    result = scores(_confusion(predicted, truth), num_predicted=2, num_classes=2)
    # class 0: TP 3, FP 0, FN 1 -> 3/4; class 1: TP 2, FP 1, FN 2 (two predicted ignore) -> 2/5
    assert result["hungarian"]["per_class_iou"] == {"0": 0.75, "1": 0.4}
    assert result["hungarian"]["miou"] == pytest.approx((0.75 + 0.4) / 2)
    assert result["hungarian"]["pixel_accuracy"] == pytest.approx(5 / 8)
    assert result["hungarian_labelled_only"]["per_class_iou"] == {"0": 0.75, "1": pytest.approx(2 / 3, abs=1e-4)}
    assert result["ignored_prediction_fraction"] == pytest.approx(2 / 8)


def test_over_clustering_reports_majority_voting_too():
    truth = np.array([[0, 0, 1, 1, 1, 1]])
    predicted = np.array([[0, 0, 1, 1, 2, 2]])  # class 1 split over two clusters
    result = scores(_confusion(predicted, truth), num_predicted=3, num_classes=2)
    assert result["hungarian"]["per_class_iou"]["1"] == 0.5
    assert result["majority"]["miou"] == 1.0


def test_evaluate_a_run_against_labels(shapes_dir, images, tmp_path):
    runner.run(tiny_config(), images, tmp_path / "wd", log=quiet)
    metrics = evaluate_workdir(tmp_path / "wd", shapes_dir / "labels")
    assert metrics["images_evaluated"] == 10 and metrics["classes"] == 5 and metrics["predicted_ids"] == 4
    assert 0.0 < metrics["miou"] <= 1.0 and 0.0 < metrics["saliency_foreground"]["iou"] <= 1.0
    assert json.loads((tmp_path / "wd" / "evaluation" / "pseudo_masks" / "metrics.json").read_text())["miou"] == metrics["miou"]


def test_evaluate_names_a_label_of_the_wrong_size(shapes_dir, images, tmp_path):
    runner.run(tiny_config(), images, tmp_path / "wd", log=quiet)
    labels = tmp_path / "labels"
    labels.mkdir()
    write_label_png(labels / "shape_0000.png", np.zeros((10, 10), np.uint8))
    with pytest.raises(InputError, match="shape_0000.png is 10x10"):
        evaluate_workdir(tmp_path / "wd", labels)
    (tmp_path / "unrelated").mkdir()
    write_label_png(tmp_path / "unrelated" / "other.png", np.zeros((10, 10), np.uint8))
    with pytest.raises(InputError, match="no label file"):
        evaluate_workdir(tmp_path / "wd", tmp_path / "unrelated")


class VOCStyleSegmentation(torch.utils.data.Dataset):
    """What torchvision's VOCSegmentation does, on the export's folder names."""

    def __init__(self, root, split="train"):
        self.root = root
        self.ids = (root / f"{split}.txt").read_text().split()

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return (Image.open(self.root / "images" / f"{self.ids[i]}.jpg").convert("RGB"),
                Image.open(self.root / "masks" / f"{self.ids[i]}.png"))


def test_export_is_a_dataset_a_voc_style_loader_reads(images, tmp_path):
    keys = runner.run(tiny_config(), images, tmp_path / "wd", log=quiet)
    meta = export_workdir(tmp_path / "wd", tmp_path / "out")
    dataset = VOCStyleSegmentation(tmp_path / "out")
    assert len(dataset) == 10 and meta["num_classes"] == 4 and meta["ignore_index"] == 255
    assert meta["artifact_keys"] == keys
    masks = tmp_path / "wd" / "cache" / "pseudo_masks" / keys["pseudo_masks"] / "masks"
    for i in range(len(dataset)):
        image, mask = dataset[i]
        assert image.size == mask.size and mask.mode == "P"
        assert np.array_equal(np.asarray(mask), np.asarray(Image.open(masks / f"{dataset.ids[i]}.png")))
        assert set(np.unique(np.asarray(mask))) <= {0, 1, 2, 3, 255}
    assert json.loads((tmp_path / "out" / "meta.json").read_text())["classes"][0] == "background"


def test_export_never_overwrites_a_folder(images, tmp_path):
    runner.run(tiny_config(), images, tmp_path / "wd", log=quiet)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "mine.txt").write_text("keep me")
    with pytest.raises(InputError, match="not empty"):
        export_workdir(tmp_path / "wd", tmp_path / "out")
    assert (tmp_path / "out" / "mine.txt").read_text() == "keep me"

"""Hungarian-matched metrics on known confusions, evaluation of a run, and the exported dataset."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools.coco import COCO

from pipeline import runner
from pipeline.errors import InputError
from pipeline.images import write_label_png
from commands.evaluate import accumulate, evaluate_workdir, metrics_file, scores
from commands.export import export_id, export_workdir, in_val
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
    metrics = evaluate_workdir(tmp_path / "wd", shapes_dir / "labels", num_classes=5)
    assert metrics["images_evaluated"] == 10 and metrics["classes"] == 5 and metrics["predicted_ids"] == 4
    assert 0.0 < metrics["miou"] <= 1.0 and 0.0 < metrics["saliency_foreground"]["iou"] <= 1.0
    saved = metrics_file(tmp_path / "wd", "pseudo_masks", shapes_dir / "labels")
    assert json.loads(saved.read_text())["miou"] == metrics["miou"]


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


def _pseudo_masks(workdir, keys) -> dict[str, np.ndarray]:
    entry = workdir / "cache" / "pseudo_masks" / keys["pseudo_masks"]
    return {path.stem: np.asarray(Image.open(path)) for path in sorted((entry / "masks").glob("*.png"))}


def test_export_is_a_dataset_a_voc_style_loader_reads(finished_run, tmp_path):
    workdir, _, keys = finished_run
    meta = export_workdir(workdir, tmp_path / "out")
    train, val = VOCStyleSegmentation(tmp_path / "out"), VOCStyleSegmentation(tmp_path / "out", "val")
    assert sorted(train.ids + val.ids) == [f"shape_{i:04d}" for i in range(10)] and not set(train.ids) & set(val.ids)
    assert meta["split"]["train"] == len(train) and meta["split"]["val"] == len(val)
    assert [i for i in train.ids + val.ids if in_val(i)] == val.ids  # the documented rule
    assert meta["format"] == "voc" and meta["num_classes"] == 4 and meta["ignore_index"] == 255 and meta["clusters"] == [0, 1, 2]
    assert meta["artifact_keys"] == keys
    pseudo = _pseudo_masks(workdir, keys)
    for dataset in (train, val):
        for i in range(len(dataset)):
            image, mask = dataset[i]
            assert image.size == mask.size and mask.mode == "P"
            assert np.array_equal(np.asarray(mask), pseudo[dataset.ids[i]])
    assert json.loads((tmp_path / "out" / "meta.json").read_text())["classes"] == ["background", "cluster_0", "cluster_1", "cluster_2"]


def test_coco_export_loads_in_pycocotools_and_decodes_to_the_pseudo_masks(finished_run, tmp_path):
    workdir, _, keys = finished_run
    names = tmp_path / "names.yaml"
    names.write_text("1: rings\n")
    meta = export_workdir(workdir, tmp_path / "out", "coco", names=names)
    coco = COCO(str(tmp_path / "out" / "annotations.json"))
    assert [(c["id"], c["name"]) for c in coco.loadCats(coco.getCatIds())] == [(1, "cluster_0"), (2, "rings"), (3, "cluster_2")]
    assert len(coco.getAnnIds()) == meta["annotations"] > 0 and len(coco.getImgIds()) == 10
    pseudo = _pseudo_masks(workdir, keys)
    for image in coco.loadImgs(coco.getImgIds()):
        assert Image.open(tmp_path / "out" / "images" / image["file_name"]).size == (image["width"], image["height"])
        expected = pseudo[image["file_name"].removesuffix(".jpg")]
        annotations = coco.loadAnns(coco.getAnnIds(imgIds=image["id"]))
        for category in (1, 2, 3):
            decoded = np.zeros(expected.shape, bool)
            for annotation in (a for a in annotations if a["category_id"] == category):
                pixels = coco.annToMask(annotation).astype(bool)
                assert not (decoded & pixels).any() and annotation["area"] == pixels.sum() and annotation["iscrowd"] == 0
                ys, xs = np.nonzero(pixels)
                assert annotation["bbox"] == [xs.min(), ys.min(), xs.max() + 1 - xs.min(), ys.max() + 1 - ys.min()]
                decoded |= pixels
            assert np.array_equal(decoded, expected == category), (image["file_name"], category)


def test_chosen_clusters_and_names_round_trip_into_meta(finished_run, tmp_path):
    workdir, _, keys = finished_run
    names = tmp_path / "names.yaml"
    names.write_text("0: discs\n2: rings\n")
    meta = export_workdir(workdir, tmp_path / "voc", "voc", clusters=[2, 0], names=names)
    saved = json.loads((tmp_path / "voc" / "meta.json").read_text())
    assert saved["clusters"] == meta["clusters"] == [0, 2] and saved["names"] == {"0": "discs", "2": "rings"}
    assert saved["classes"] == ["background", "discs", "cluster_1", "rings"]
    for image_id, pseudo in _pseudo_masks(workdir, keys).items():
        exported = np.asarray(Image.open(tmp_path / "voc" / "masks" / f"{image_id}.png"))
        assert np.array_equal(exported, np.where(pseudo == 2, 255, pseudo))  # cluster 1 = mask value 2 -> ignore
    export_workdir(workdir, tmp_path / "coco", "coco", clusters=[1], names=names)
    coco = json.loads((tmp_path / "coco" / "annotations.json").read_text())
    assert [c["id"] for c in coco["categories"]] == [2] and {a["category_id"] for a in coco["annotations"]} == {2}
    assert json.loads((tmp_path / "coco" / "meta.json").read_text())["clusters"] == [1]
    with pytest.raises(InputError, match="names.yaml: 5 is not a cluster"):
        export_workdir(workdir, tmp_path / "bad", names=_write(tmp_path / "names.yaml", "5: sky\n"))
    assert not (tmp_path / "bad").exists()


def _write(path, text):
    path.write_text(text)
    return path


def test_export_names_stay_inside_the_export_folder():
    assert export_id("a/b.photo.jpg") == "a/b.photo"
    for name in ("../x.jpg", "a/../../x.jpg", "/etc/x.jpg", "a\\..\\x.jpg"):
        with pytest.raises(InputError, match="outside the export folder"):
            export_id(name)


def test_export_never_overwrites_a_folder(finished_run, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "mine.txt").write_text("keep me")
    with pytest.raises(InputError, match="not empty"):
        export_workdir(finished_run[0], tmp_path / "out")
    assert (tmp_path / "out" / "mine.txt").read_text() == "keep me"
    assert not list(tmp_path.glob("out.tmp-*"))

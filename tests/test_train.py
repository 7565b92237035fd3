"""The segmenter: learning, checkpoints, resume, bad input, predict, and DDP under torchrun."""
from __future__ import annotations

import csv
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import stages.train
from pipeline import distributed, runner
from pipeline.artifacts import read_json
from pipeline.backbones import BackboneParams
from pipeline.errors import ConfigError, InputError
from pipeline.images import read_label_png, write_label_png
from pipeline.outputs import read_mask
from pipeline.refine import RefineParams
from pipeline.segmenter import (Inference, Segmenter, load_checkpoint, region_votes, salient_regions, save_checkpoint,
                                segmenter_from_checkpoint)
from commands.predict import predict_folder, saliency_masks
from tests.conftest import ROOT, quiet, tiny_config


def _train(images, workdir, *overrides):
    return runner.run(tiny_config(*overrides), images, workdir, log=quiet)


def _entry(workdir, keys):
    return workdir / "cache" / "train" / keys["train"]


def _last_entry(workdir):
    """The train entry of the workdir's last run (made by the CLI)."""
    return runner.Workdir(workdir).latest_entry("train")


def _log(entry):
    with open(entry / "train_log.csv") as f:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]


def test_training_lowers_the_loss_and_self_training_adds_a_round(images, tmp_path, monkeypatch):
    balanced, initial = [], []
    real_class_weights = stages.train.class_weights
    monkeypatch.setattr(stages.train, "class_weights", lambda targets, *args: balanced.append(targets) or real_class_weights(targets, *args))

    class AdamNotingWhereItStarts(torch.optim.Adam):
        def step(self, *args, **kwargs):
            if not self.state:  # no step taken yet
                initial.append([p.detach().clone() for g in self.param_groups for p in g["params"]])
            return super().step(*args, **kwargs)

    monkeypatch.setattr(torch.optim, "Adam", AdamNotingWhereItStarts)
    keys = _train(images, tmp_path / "wd", "train.epochs=8", "train.rounds=2")
    assert len(balanced) == 2 and "pseudo_masks" in str(balanced[0][0])  # each round balanced on its own targets,
    assert "round1_masks" in str(balanced[1][0])  # round 2 on round 1's predictions
    torch.manual_seed(tiny_config().seed + 2)  # round 2 starts from a new network, not from round 1's
    fresh = Segmenter(BackboneParams("vit_tiny_random"), 4).head.parameters()  # on the CPU the trunk stays frozen
    assert len(initial) == 2 and all(torch.equal(a, b) for a, b in zip(initial[1], fresh, strict=True))
    log = _log(_entry(tmp_path / "wd", keys))
    assert [(r["round"], r["epoch"]) for r in log] == [(1, e) for e in range(1, 9)] + [(2, e) for e in range(1, 9)]
    first_round = [r["loss"] for r in log if r["round"] == 1]
    assert first_round[-1] < first_round[0] * 0.8
    entry = _entry(tmp_path / "wd", keys)
    assert {p.name for p in entry.iterdir()} >= {"latest.pt", "best.pt", "masks", "items.json", "train_log.csv"}
    assert load_checkpoint(entry / "latest.pt")["inference"]["short_side"] == 80  # the mean of the rescale range, 32-128
    assert not (tmp_path / "wd" / "cache" / "train" / f"{keys['train']}.work").exists()
    with Image.open(entry / "masks" / "shape_0000.png") as mask:
        assert mask.size == (160, 120) and set(np.unique(np.asarray(mask))) <= {0, 1, 2, 3}


def test_checkpoint_round_trip_gives_the_same_predictions(tmp_path):
    model = Segmenter(BackboneParams("vit_tiny_random"), 4).eval()
    save_checkpoint(tmp_path / "c.pt", model, {"backbone": {"name": "vit_tiny_random", "weights": ""}, "num_classes": 4})
    loaded, payload = segmenter_from_checkpoint(tmp_path / "c.pt", torch.device("cpu"))
    x = torch.randn(2, 3, 64, 48)
    with torch.inference_mode():
        assert torch.equal(model(x), loaded(x))
    assert payload["num_classes"] == 4 and "rng" in payload


def test_each_salient_region_takes_the_object_class_its_pixels_find_likeliest_on_average():
    probabilities = np.zeros((12, 16, 4), np.float32)
    probabilities[...] = (0.7, 0.1, 0.1, 0.1)
    labels, confidence = np.zeros((12, 16), np.uint8), np.full((12, 16), 0.7, np.float32)
    foreground = np.zeros((12, 16), np.uint8)
    foreground[1:4, 1:4] = foreground[4:6, 4:6] = 255  # touching at a corner: one region (8-connected)
    probabilities[1:4, 1:4] = (0.6, 0.1, 0.1, 0.2)  # background wins each pixel; class 3 is the likeliest object
    probabilities[4:6, 4:6] = (0.1, 0.5, 0.1, 0.3)  # 4 pixels for class 1 cannot outvote 9 pixels' mean for 3
    foreground[8:11, 8:14] = 1
    probabilities[8:11, 8:10] = (0.0, 0.9, 0.1, 0.0)  # 6 pixels sure of class 1 ...
    probabilities[8:11, 10:14] = (0.0, 0.4, 0.6, 0.0)  # ... outweigh 12 that lean to class 2
    labels[0, 10:16] = 2  # the segmenter's own object outside any salient region stays
    voted, sure = region_votes(probabilities, salient_regions(foreground), labels, confidence)
    assert (voted[1:4, 1:4] == 3).all() and (voted[4:6, 4:6] == 3).all() and (voted[8:11, 8:14] == 1).all()
    assert (voted[0, 10:16] == 2).all() and voted[foreground == 0].sum() == 12  # elsewhere unchanged
    assert sure[9, 12] == pytest.approx((6 * 0.9 + 12 * 0.4) / 18) and sure[0, 0] == pytest.approx(0.7)
    with pytest.raises(ValueError, match="foreground"):
        Segmenter(BackboneParams("vit_tiny_random"), 4).eval().predict(
            np.zeros((32, 32, 3), np.uint8), Inference(32, region_vote=True))


def test_checkpoints_that_do_not_fit_are_named(tmp_path):
    model = Segmenter(BackboneParams("vit_tiny_random"), 4)
    save_checkpoint(tmp_path / "c.pt", model, {"backbone": {"name": "vit_tiny_random", "weights": ""}, "num_classes": 4})
    with pytest.raises(InputError, match=r"c.pt is for 4 classes, not 6"):
        load_checkpoint(tmp_path / "c.pt", num_classes=6)
    with pytest.raises(InputError, match=r"c.pt is for backbone vit_tiny_random, not resnet50"):
        load_checkpoint(tmp_path / "c.pt", backbone="resnet50")
    torch.save({"state_dict": {}}, tmp_path / "foreign.pt")
    with pytest.raises(InputError, match="foreign.pt: not an objseg segmenter checkpoint"):
        load_checkpoint(tmp_path / "foreign.pt")
    (tmp_path / "text.pt").write_text("hello")
    with pytest.raises(InputError, match="text.pt: not a readable checkpoint"):
        load_checkpoint(tmp_path / "text.pt")


@pytest.mark.parametrize("trunk", ["frozen", "finetune"])
def test_interrupted_training_resumes_from_its_last_checkpoint(images, tmp_path, monkeypatch, trunk):
    uninterrupted = _train(images, tmp_path / "clean", "train.epochs=4", f"train.trunk={trunk}")
    real_save, saved = stages.train.save_checkpoint, []

    def save_then_die(path, *args, **kwargs):
        real_save(path, *args, **kwargs)
        saved.append(path.name)
        if saved.count("round1_latest.pt") == 2:
            raise KeyboardInterrupt  # as if killed right after epoch 2's checkpoint

    monkeypatch.setattr(stages.train, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        _train(images, tmp_path / "wd", "train.epochs=4", f"train.trunk={trunk}")
    monkeypatch.setattr(stages.train, "save_checkpoint", real_save)
    resumed = _train(images, tmp_path / "wd", "train.epochs=4", f"train.trunk={trunk}")
    clean_log, resumed_log = _log(_entry(tmp_path / "clean", uninterrupted)), _log(_entry(tmp_path / "wd", resumed))
    assert [r["epoch"] for r in resumed_log] == [1, 2, 3, 4]
    np.testing.assert_allclose([r["loss"] for r in resumed_log], [r["loss"] for r in clean_log], rtol=1e-4)
    a = torch.load(_entry(tmp_path / "clean", uninterrupted) / "latest.pt", weights_only=True)
    b = torch.load(_entry(tmp_path / "wd", resumed) / "latest.pt", weights_only=True)
    assert a["model"].keys() == b["model"].keys()
    assert all(torch.equal(a["model"][name], b["model"][name]) for name in a["model"])  # on the CPU: bit for bit


def test_the_frozen_trunk_stays_as_loaded_and_predict_segments_as_training_did(images, tmp_path):
    options = ("train.rounds=2", "train.epochs=2", "train.scales=[0.75, 1.0]", "train.refine.method=guided")
    entry = _entry(tmp_path / "wd", _train(images, tmp_path / "wd", *options))
    payload = load_checkpoint(entry / "latest.pt")
    assert payload["config"]["trunk"] == "frozen"  # auto, on the CPU
    torch.manual_seed(tiny_config().seed)  # the random test trunk the features were computed with
    loaded = Segmenter(BackboneParams("vit_tiny_random"), 4).trunk.state_dict()
    assert all(torch.equal(payload["model"][f"trunk.{name}"], value) for name, value in loaded.items())
    assert Inference.from_dict(payload["inference"]) == Inference(80, (0.75, 1.0), RefineParams("guided"), region_vote=True)
    predict_folder(entry / "latest.pt", images, tmp_path / "out", torch.device("cpu"))
    predict_folder(entry / "latest.pt", images, tmp_path / "plain", torch.device("cpu"), inference=Inference(80))
    agree = {"out": [], "plain": []}
    for mask in sorted((entry / "masks").glob("*.png")):
        for name in agree:
            agree[name].append(np.mean(read_label_png(mask) == read_label_png(tmp_path / name / "masks" / mask.name)))
    # The same options (features cached in float16 for training's own predictions, float32 in predict)
    assert np.mean(agree["out"]) > 0.995 and np.mean(agree["out"]) > np.mean(agree["plain"])
    # predict masked the photos with the run's saliency settings (cached: asked again, nothing is recomputed),
    # and gave each salient region one object class
    foreground = saliency_masks(payload, images, tmp_path / "out" / "saliency", torch.device("cpu"))
    assert len(foreground) == 10
    for rel, path in foreground.items():
        labels = read_label_png(tmp_path / "out" / "masks" / f"{Path(rel).stem}.png")
        regions = salient_regions(read_mask(path))
        assert all(np.unique(labels[regions == r]).size == 1 and labels[regions == r].min() > 0
                   for r in range(1, regions.max() + 1))


@pytest.mark.parametrize("backbone", ["mobilenet_v2", "resnet50"])
def test_splitting_off_the_tuned_blocks_keeps_the_network_and_its_state_dict(backbone):
    model = Segmenter(BackboneParams(backbone, "random"), 4).eval()
    x, keys = torch.randn(1, 3, 64, 48), list(model.state_dict())
    with torch.inference_mode():
        whole = model(x)
        model.split(2)
        cut = model.features(x)
        assert torch.allclose(model(x), whole, atol=1e-5) and list(model.state_dict()) == keys
        assert torch.allclose(model.logits(cut), model.head(model.top()[1](model.top()[0](cut))))
    with pytest.raises(ConfigError, match="tuned_blocks must be in"):
        model.split(len(model._blocks()))


def test_tuned_blocks_train_with_the_head_on_their_cached_inputs(images, tmp_path):
    options = ("train.backbone=mobilenet_v2", "train.weights=random", "train.tuned_blocks=2", "train.epochs=2")
    entry = _entry(tmp_path / "wd", _train(images, tmp_path / "wd", *options))
    trained = load_checkpoint(entry / "latest.pt")["model"]
    initial = Segmenter(BackboneParams("mobilenet_v2", "random"), 4).state_dict()
    moved = {name.split(".")[2] for name, value in initial.items()
             if name.startswith("trunk.") and not torch.equal(value, trained[name])}
    assert moved == {"16", "17"}  # the last two blocks learnt; the rest of the trunk is as loaded
    assert all(torch.equal(initial[n], trained[n]) for n in initial if n.startswith("trunk.") and "running" in n)
    predict_folder(entry / "latest.pt", images, tmp_path / "out", torch.device("cpu"))
    agree = [np.mean(read_label_png(mask) == read_label_png(tmp_path / "out" / "masks" / mask.name))
             for mask in sorted((entry / "masks").glob("*.png"))]
    assert np.mean(agree) > 0.995  # predict runs the whole trunk; training's predictions ran the cached views
    with pytest.raises(ConfigError, match="needs a convolutional trunk"):
        _train(images, tmp_path / "vit", "train.tuned_blocks=1")


def test_targets_ignore_the_border_band_and_unconfident_pixels(tmp_path):
    labels = np.zeros((6, 10), np.uint8)
    labels[:, 5:] = 3
    write_label_png(tmp_path / "labels.png", labels)
    confidence = np.full((6, 10), 200, np.uint8)
    confidence[0] = 127  # below 0.5 x 255
    write_label_png(tmp_path / "confidence.png", confidence)
    banded = stages.train.Target(tmp_path / "labels.png", border=2).read()
    assert (banded[:, 3:7] == 255).all() and (banded[:, :3] == 0).all() and (banded[:, 7:] == 3).all()
    confident = stages.train.Target(tmp_path / "labels.png", tmp_path / "confidence.png", 0.5).read()
    assert (confident[0] == 255).all() and np.array_equal(confident[1:], labels[1:])


def test_the_trunk_mode_the_device_resolves_to_is_the_cache_key():
    frozen = stages.train.key_params(tiny_config())
    assert frozen["trunk"] == "frozen" and frozen == stages.train.key_params(tiny_config("train.trunk=frozen"))
    finetune = stages.train.key_params(tiny_config("train.trunk=finetune", "train.epochs=0", "train.lr=0"))
    assert (finetune["epochs"], finetune["lr"]) == (stages.train.RECIPES["finetune"]["epochs"], 6e-5)
    assert "tuned_blocks" not in frozen and stages.train.key_params(tiny_config("train.tuned_blocks=2"))["tuned_blocks"] == 2
    assert finetune == stages.train.key_params(tiny_config("train.trunk=finetune", "train.epochs=0", "train.lr=0",
                                                           "train.tuned_blocks=2"))  # finetuning trains every block


def _pseudo_entry(images, workdir):
    keys = runner.run(tiny_config(), images, workdir, start="pseudo_masks", only=True, log=quiet)
    return workdir / "cache" / "pseudo_masks" / keys["pseudo_masks"]


def test_a_missing_pseudo_mask_is_reported_and_recomputed_before_training(images, tmp_path, capfd):
    entry = _pseudo_entry(images, tmp_path / "wd")
    (entry / "masks" / "shape_0004.png").unlink()
    _train(images, tmp_path / "wd")
    assert "masks/shape_0004.png: missing" in capfd.readouterr().err
    assert (entry / "masks" / "shape_0004.png").is_file()


def test_training_pairs_are_checked_before_training_and_the_bad_file_is_named(images, tmp_path):
    entry = _pseudo_entry(images, tmp_path / "wd")
    masks = [entry / "masks" / f"shape_{i:04d}.png" for i in range(3)]
    pictures = [images / f"shape_{i:04d}.jpg" for i in range(3)]
    write_label_png(masks[2], np.zeros((10, 20), np.uint8))
    with pytest.raises(InputError, match=r"shape_0002.png is 20x10 but its image .*shape_0002.jpg is 160x120"):
        stages.train._check_pairs(pictures, masks)
    masks[1].unlink()
    with pytest.raises(InputError, match="shape_0001.png: missing or unreadable pseudo mask"):
        stages.train._check_pairs(pictures, masks)


def test_predict_segments_unseen_images_and_resumes(shapes_dir, images, tmp_path):
    keys = _train(images, tmp_path / "wd")
    checkpoint = _entry(tmp_path / "wd", keys) / "best.pt"
    unseen = tmp_path / "unseen"
    unseen.mkdir()
    rgb = np.asarray(Image.open(images / "shape_0001.jpg"))
    Image.fromarray(rgb[:, ::-1]).save(unseen / "mirrored.png")
    Image.fromarray(rgb[:100, :90]).save(unseen / "cropped.jpg")
    (unseen / "broken.jpg").write_bytes(b"\xff\xd8 nope")
    summary = predict_folder(checkpoint, unseen, tmp_path / "out", torch.device("cpu"))
    assert summary["computed"] == 2 and [s["image"] for s in summary["skipped"]] == ["broken.jpg"]
    with Image.open(tmp_path / "out" / "masks" / "cropped.png") as mask:
        assert mask.size == (90, 100) and mask.mode == "P"
    with Image.open(tmp_path / "out" / "overlays" / "mirrored.jpg") as overlay:
        assert overlay.size == (160, 120)
    again = predict_folder(checkpoint, unseen, tmp_path / "out", torch.device("cpu"))
    assert again["computed"] == 0  # finished masks are kept
    other = tmp_path / "other.pt"
    shutil.copy(checkpoint, other)
    with open(other, "ab") as f:
        f.write(b"\0")
    with pytest.raises(InputError, match="another checkpoint"):
        predict_folder(other, unseen, tmp_path / "out", torch.device("cpu"))
    payload = torch.load(checkpoint, weights_only=True)  # region votes need the run's saliency model, gone here
    payload["run_config"]["saliency"].update(method="onnx", model=str(tmp_path / "gone.onnx"))
    torch.save(payload, other)
    with pytest.raises(InputError, match="gone.onnx: no such file"):
        predict_folder(other, unseen, tmp_path / "elsewhere", torch.device("cpu"))


def test_evaluate_the_segmenter(shapes_dir, images, tmp_path):
    from commands.evaluate import evaluate_workdir

    _train(images, tmp_path / "wd")
    metrics = evaluate_workdir(tmp_path / "wd", shapes_dir / "labels", source="segmenter")
    assert metrics["source"] == "segmenter" and metrics["images_evaluated"] == 10 and 0 <= metrics["miou"] <= 1


@pytest.mark.slow
def test_torchrun_ddp_matches_a_single_process_with_the_same_global_batch(images, tmp_path):
    for i in range(10):  # 20 images: two steps of 8 per epoch, 4 per process
        shutil.copy(images / f"shape_{i:04d}.jpg", images / f"copy_{i:04d}.jpg")
    # the recipe DDP is for (GPUs); frozen-trunk DDP gives equal weights over ranks too, but with the head's
    # BatchNorm alone seeing half batches its loss curve strays further (13% at epoch 3 here)
    base = ["--images", str(images), *tiny_config_args("train.epochs=3", "train.batch_size=8", "train.trunk=finetune")]
    _cli = [sys.executable, str(ROOT / "run_pipeline.py")]
    assert subprocess.run([*_cli, "stage", "pseudo_masks", "--only", "--workdir", str(tmp_path / "one"), *base],
                          cwd=ROOT, capture_output=True).returncode == 0
    shutil.copytree(tmp_path / "one", tmp_path / "two")
    single = subprocess.run([*_cli, "stage", "train", "--workdir", str(tmp_path / "one"), *base], cwd=ROOT,
                            capture_output=True, text=True)
    assert single.returncode == 0, single.stderr
    (tmp_path / "each_rank.py").write_text(EACH_RANK_SAVES_ITS_WEIGHTS)
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          str(tmp_path / "each_rank.py"), str(ROOT), str(tmp_path),
                          "stage", "train", "--workdir", str(tmp_path / "two"), *base],
                         cwd=ROOT, capture_output=True, text=True)
    assert ddp.returncode == 0, ddp.stderr[-2000:]
    one, two = _last_entry(tmp_path / "one"), _last_entry(tmp_path / "two")
    assert read_json(two / "manifest.json")["counts"]["processes"] == 2
    # Gradients are averaged over the processes, so both end with the same weights: the ones rank 0 saved.
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    saved = load_checkpoint(two / "latest.pt")["model"]
    assert ranks[0].keys() == ranks[1].keys() and len(ranks[0]) > 10
    assert all(torch.equal(ranks[0][name], ranks[1][name]) and torch.equal(ranks[0][name], saved[name]) for name in ranks[0])
    single_loss, ddp_loss = [r["loss"] for r in _log(one)], [r["loss"] for r in _log(two)]
    # Same samples and augmentations per step; only the head's BatchNorm sees half batches per process
    # (SyncBatchNorm is CUDA-only), so the curves agree within a tolerance, not exactly.
    np.testing.assert_allclose(ddp_loss, single_loss, rtol=0.1)
    assert ddp_loss[-1] < ddp_loss[0]


# Run by torchrun: the CLI (argv[3:]), then each process saves the parameters its last training step left
# in its network (rank 1 writes no checkpoint) to argv[2]/rank<RANK>.pt.
EACH_RANK_SAVES_ITS_WEIGHTS = """
import os, sys
sys.path.insert(0, sys.argv[1])
import torch
import run_pipeline
import stages.train

networks, real_step = [], stages.train.train_step
stages.train.train_step = lambda net, *args: networks.append(net) or real_step(net, *args)
code = run_pipeline.main(sys.argv[3:])
model = getattr(networks[-1], "module", networks[-1])  # inside DistributedDataParallel
weights = {name: p.detach().clone() for name, p in model.named_parameters()}
torch.save(weights, os.path.join(sys.argv[2], f"rank{os.environ['RANK']}.pt"))
sys.exit(code)
"""


def tiny_config_args(*overrides):
    from tests.conftest import TINY
    return [*TINY, *overrides]


def test_a_global_batch_that_does_not_split_over_the_processes_is_refused(images, tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setattr(distributed, "join", lambda device: distributed.Share(0, 3))  # rank 0 checks for all
    with pytest.raises(ConfigError, match="train.batch_size=4 does not split over 3 processes"):
        _train(images, tmp_path / "wd")
    assert not (tmp_path / "wd" / "cache").exists()  # refused before any work


def test_a_batch_of_one_is_a_one_line_error_before_any_work(images, tmp_path, capsys):
    import run_pipeline

    args = ["run", "--images", str(images), "--workdir", str(tmp_path / "wd"), *tiny_config_args("train.batch_size=1")]
    assert run_pipeline.main(args) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines() == ["error: train.batch_size must be >= 2 (BatchNorm needs 2 samples per step), got 1"]
    assert not (tmp_path / "wd" / "cache").exists()


def test_one_sample_per_process_on_the_cpu_is_refused_before_any_work(images, tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")  # as under torchrun: no SyncBatchNorm on the CPU, each process normalises alone
    monkeypatch.setattr(distributed, "join", lambda device: distributed.Share(0, 2))
    with pytest.raises(ConfigError, match="train.batch_size=2 leaves 1 sample per process over 2 processes"):
        _train(images, tmp_path / "wd", "train.batch_size=2")
    assert not (tmp_path / "wd" / "cache").exists()


@pytest.mark.parametrize("kept", [1, 3, 5])  # one image, fewer than a batch, a last batch of one sample
def test_every_step_trains_on_a_full_batch_whatever_the_folder_size(images, tmp_path, monkeypatch, kept):
    for extra in sorted(images.iterdir())[kept:]:
        extra.unlink()
    batches, real_step = [], stages.train.train_step
    monkeypatch.setattr(stages.train, "train_step", lambda net, loss, opt, scaler, batch:
                        batches.append(len(batch[0])) or real_step(net, loss, opt, scaler, batch))
    keys = _train(images, tmp_path / "wd", "train.epochs=2", *(["cluster.k=1"] if kept == 1 else []))
    assert batches == [4, 4]  # one step of 4 per epoch: fewer images are repeated to fill it, a fifth one dropped
    assert read_json(_entry(tmp_path / "wd", keys) / "manifest.json")["counts"]["images"] == kept


@pytest.mark.slow
def test_kill_9_during_training_then_run_again_resumes_and_matches(images, tmp_path):
    import signal
    import time

    args = ["run", "--images", str(images), *tiny_config_args("train.epochs=6", "train.crop_size=96", "train.base_size=96")]
    cli = [sys.executable, str(ROOT / "run_pipeline.py")]
    process = subprocess.Popen([*cli, *args, "--workdir", str(tmp_path / "wd")], cwd=ROOT,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    latest = None
    while time.time() < deadline and process.poll() is None:
        found = list((tmp_path / "wd" / "cache" / "train").glob("*.work/round1_latest.pt"))
        if found and load_checkpoint(found[0])["epoch"] >= 2:
            latest = found[0]
            break
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert latest is not None and load_checkpoint(latest)["epoch"] < 6, "the kill came too late to test resumption"
    resumed = subprocess.run([*cli, *args, "--workdir", str(tmp_path / "wd")], cwd=ROOT, capture_output=True, text=True)
    assert resumed.returncode == 0 and "resuming round 1 after epoch" in resumed.stdout
    assert subprocess.run([*cli, *args, "--workdir", str(tmp_path / "clean")], cwd=ROOT).returncode == 0
    killed, clean = (load_checkpoint(_last_entry(tmp_path / d) / "latest.pt")["model"] for d in ("wd", "clean"))
    assert killed.keys() == clean.keys() and all(torch.equal(killed[name], clean[name]) for name in clean)  # on the CPU


def test_class_weights_balance_the_clusters_and_leave_background_at_one(tmp_path):
    masks = []
    for i, counts in enumerate([(60, 36, 4), (100, 0, 0)]):  # background, cluster 1, cluster 2 pixels per mask
        labels = np.concatenate([np.full(n, value, np.uint8) for value, n in enumerate(counts)] + [np.full(10, 255, np.uint8)])
        write_label_png(tmp_path / f"{i}.png", labels.reshape(1, -1))
        masks.append(stages.train.Target(tmp_path / f"{i}.png"))
    ctx = type("Ctx", (), {"progress": staticmethod(lambda items, desc: items)})()
    weights = stages.train.class_weights(masks, 4, 0.5, ctx)
    assert weights[0] == 1 and weights[3] == 0  # background as is; cluster 3 never occurs
    assert weights[2] / weights[1] == pytest.approx(3.0)  # (36 / 4) ** 0.5
    assert (weights[1] * 36 + weights[2] * 4) / 40 == pytest.approx(1.0)  # an average object pixel weighs 1
    assert torch.equal(stages.train.class_weights(masks, 4, 0.0, ctx)[:3], torch.ones(3))

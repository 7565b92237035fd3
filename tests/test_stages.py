"""Each stage on tiny models and synthetic images."""
from __future__ import annotations


import cv2
import numpy as np
import pytest
from PIL import Image

from pipeline import runner
from pipeline.artifacts import read_json
from pipeline.errors import InputError
from stages import cluster, objects, saliency
from stages.saliency import fiedler_foreground
from tests.conftest import quiet, tiny_config


def _run(images, workdir, *overrides, **kwargs):
    return runner.run(tiny_config(*overrides), images, workdir, log=quiet, **kwargs)


def _entry(workdir, stage, keys):
    return workdir / "cache" / stage / keys[stage]


def test_spectral_saliency_writes_binary_masks_at_image_size_that_find_the_objects(shapes_dir, images, tmp_path):
    keys = _run(images, tmp_path / "wd", start="saliency", only=True)
    items = read_json(_entry(tmp_path / "wd", "saliency", keys) / "items.json")
    assert len(items) == 10
    overlaps = []
    for item in items:
        mask = cv2.imread(str(tmp_path / "wd" / "cache" / "saliency" / "items" / f"{item['key']}.png"), cv2.IMREAD_UNCHANGED)
        assert mask.shape == (120, 160) and mask.dtype == np.uint8
        assert set(np.unique(mask)) == {0, 255}  # some foreground, not all of it
        truth = np.asarray(Image.open(shapes_dir / "labels" / item["image"].replace(".jpg", ".png"))) > 0
        overlaps.append(((mask > 0) & truth).sum() / ((mask > 0) | truth).sum())
    # The tiny random ViT's cut scores 0.59 mean IoU with the drawn objects; the inverted cut 0.13,
    # the mask flipped upside down 0.32, the whole image 0.40.
    assert np.mean(overlaps) > 0.45 and min(overlaps) > 0.2


def test_fiedler_vector_separates_two_groups_and_picks_the_centre_as_foreground():
    grid = (8, 8)
    yy, xx = np.mgrid[:8, :8]
    centre = (abs(yy - 3.5) < 2) & (abs(xx - 3.5) < 2)
    rng = np.random.default_rng(0)
    features = np.where(centre.reshape(-1, 1), [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]) + rng.normal(0, 0.05, (64, 3))
    score = fiedler_foreground(features, grid, tau=0.3)
    assert ((score > 0) == centre).all()


def test_folder_saliency_uses_the_users_masks(shapes_dir, images, tmp_path):
    masks = tmp_path / "masks"
    masks.mkdir()
    for label in (shapes_dir / "labels").iterdir():  # the true foreground as the "user's" masks
        truth = np.asarray(Image.open(label))
        cv2.imwrite(str(masks / label.name), np.where(truth > 0, 255, 0).astype(np.uint8))
    keys = _run(images, tmp_path / "wd", "saliency.method=folder", f"saliency.masks_dir={masks}", start="saliency", only=True)
    item = read_json(_entry(tmp_path / "wd", "saliency", keys) / "items.json")[0]
    mask = cv2.imread(str(tmp_path / "wd" / "cache" / "saliency" / "items" / f"{item['key']}.png"), cv2.IMREAD_GRAYSCALE)
    truth = np.asarray(Image.open(shapes_dir / "labels" / item["image"].replace(".jpg", ".png")))
    assert ((mask > 0) == (truth > 0)).all()


def test_folder_saliency_missing_masks_fail_before_any_work(images, tmp_path):
    masks = tmp_path / "masks"
    masks.mkdir()
    cv2.imwrite(str(masks / "shape_0000.png"), np.zeros((120, 160), np.uint8))
    with pytest.raises(InputError, match=r"no mask for 9 of 10 images: shape_0001.jpg"):
        _run(images, tmp_path / "wd", "saliency.method=folder", f"saliency.masks_dir={masks}")
    assert not (tmp_path / "wd" / "cache").exists()


def test_onnx_saliency_runs_a_model_with_the_configured_preprocessing(images, tmp_path):
    import onnx
    from onnx import TensorProto, helper

    # A "model" whose foreground is where the normalised red channel is high: output = sigmoid(20 * red).
    graph = helper.make_graph(
        [helper.make_node("Slice", ["input", "start", "end", "axis"], ["red"]),
         helper.make_node("Mul", ["red", "gain"], ["logit"]),
         helper.make_node("Sigmoid", ["logit"], ["output"])],
        "red", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 64, 64])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 1, 64, 64])],
        [helper.make_tensor("start", TensorProto.INT64, [1], [0]), helper.make_tensor("end", TensorProto.INT64, [1], [1]),
         helper.make_tensor("axis", TensorProto.INT64, [1], [1]), helper.make_tensor("gain", TensorProto.FLOAT, [], [20.0])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)])
    model.ir_version = 8
    path = tmp_path / "red.onnx"
    onnx.save(model, path)
    red = np.zeros((120, 160, 3), np.uint8)
    red[30:90, 40:120, 0] = 255
    only = tmp_path / "one"
    only.mkdir()
    cv2.imwrite(str(only / "red.png"), red[..., ::-1])
    keys = _run(only, tmp_path / "wd", "saliency.method=onnx", f"saliency.model={path}", "saliency.input_size=0",
                start="saliency", only=True)
    item = read_json(_entry(tmp_path / "wd", "saliency", keys) / "items.json")[0]
    mask = cv2.imread(str(tmp_path / "wd" / "cache" / "saliency" / "items" / f"{item['key']}.png"), cv2.IMREAD_GRAYSCALE)
    assert mask.shape == (120, 160)
    inside, outside = mask[35:85, 45:115], np.concatenate([mask[:25].ravel(), mask[95:].ravel()])
    assert (inside == 255).all() and (outside == 0).all()  # mean 0.5: red 255 -> +0.5 -> fg; 0 -> -0.5 -> bg


def test_a_float16_onnx_model_runs_in_float32_on_the_cpu_with_the_same_output(tmp_path):
    import onnx
    import onnxruntime
    from onnx import TensorProto, helper, numpy_helper

    # input (float32) -> Cast to float16 -> Mul by a float16 weight -> Add a float16 Constant -> Sigmoid -> Cast back
    weight = numpy_helper.from_array(np.full((1, 3, 1, 1), 0.7, np.float16), "weight")
    graph = helper.make_graph(
        [helper.make_node("Cast", ["input"], ["half"], to=TensorProto.FLOAT16),
         helper.make_node("Mul", ["half", "weight"], ["scaled"]),
         helper.make_node("Constant", [], ["bias"], value=numpy_helper.from_array(np.array(-0.25, np.float16))),
         helper.make_node("Add", ["scaled", "bias"], ["logit"]),
         helper.make_node("Sigmoid", ["logit"], ["prob"]),
         helper.make_node("Cast", ["prob"], ["output"], to=TensorProto.FLOAT)],
        "half", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 3, 8, 8])], [weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)])
    model.ir_version = 8
    onnx.save(model, tmp_path / "half.onnx")
    widened = onnx.load_from_string(saliency.float32_model(str(tmp_path / "half.onnx")))
    assert all(t.data_type == TensorProto.FLOAT for t in widened.graph.initializer)
    assert all(a.i == TensorProto.FLOAT for n in widened.graph.node if n.op_type == "Cast" for a in n.attribute)
    x = np.random.default_rng(0).normal(size=(1, 3, 8, 8)).astype(np.float32)
    outputs = [onnxruntime.InferenceSession(m, providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
               for m in (str(tmp_path / "half.onnx"), saliency.float32_model(str(tmp_path / "half.onnx")))]
    assert np.abs(outputs[0] - outputs[1]).max() < 2e-3  # float16 rounding only


def test_objects_are_components_with_margins_and_small_ones_ignored():
    mask = np.zeros((100, 200), np.uint8)
    mask[10:30, 10:50] = 255  # 800 px
    mask[60:90, 100:190] = 255  # 2700 px
    mask[5:7, 150:152] = 255  # 4 px: salient but too small
    object_map, boxes = objects.find_objects(mask, objects.Params(min_area=0.01, margin=0.1))
    assert boxes.tolist() == [[6, 8, 54, 32], [91, 57, 199, 93]]
    assert (object_map[10:30, 10:50] == 1).all() and (object_map[60:90, 100:190] == 2).all()
    assert (object_map[5:7, 150:152] == objects.IGNORE).all()
    assert (object_map[mask == 0] == 0).all()
    single_map, single = objects.find_objects(mask, objects.Params(min_area=0.01, margin=0.0, one_box_per_image=True))
    assert len(single) == 1 and single[0].tolist() == [10, 5, 190, 90]
    assert set(np.unique(single_map[mask > 0])) == {1}


def test_objects_keep_the_largest_up_to_max_objects():
    mask = np.zeros((50, 200), np.uint8)
    for i, width in enumerate((4, 8, 12)):
        mask[10:30, 10 + 60 * i:10 + 60 * i + width] = 255
    object_map, boxes = objects.find_objects(mask, objects.Params(min_area=0.0, margin=0.0, max_objects=2))
    assert boxes.tolist() == [[70, 10, 78, 30], [130, 10, 142, 30]]
    assert (object_map[10:30, 10:14] == objects.IGNORE).all()


def test_embeddings_are_unit_vectors_one_row_per_object(images, tmp_path):
    keys = _run(images, tmp_path / "wd", start="embed", only=True)
    embed_entry = _entry(tmp_path / "wd", "embed", keys)
    vectors = np.load(embed_entry / "embeddings.npy")
    rows = np.load(embed_entry / "objects.npz")
    object_items = read_json(_entry(tmp_path / "wd", "objects", keys) / "items.json")
    assert vectors.shape == (sum(i["objects"] for i in object_items), 48)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    for position, item in enumerate(object_items):
        assert (rows["image_index"] == position).sum() == item["objects"]


def test_embeddings_do_not_depend_on_batch_or_shard_size(images, tmp_path):
    a = _run(images, tmp_path / "a", "embed.batch_size=64", start="embed", only=True)
    b = _run(images, tmp_path / "b", "embed.batch_size=3", "embed.shard_images=2", start="embed", only=True)
    np.testing.assert_allclose(np.load(_entry(tmp_path / "a", "embed", a) / "embeddings.npy"),
                               np.load(_entry(tmp_path / "b", "embed", b) / "embeddings.npy"), atol=1e-5)


def _blobs(n_per: int, centers: np.ndarray, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    points = np.concatenate([c + rng.normal(0, 0.05, (n_per, centers.shape[1])) for c in centers]).astype(np.float32)
    return points / np.linalg.norm(points, axis=1, keepdims=True)


@pytest.mark.parametrize("method", cluster.METHODS)
def test_clustering_is_seeded_respects_k_and_finds_separated_clusters(method):
    centers = np.eye(8, 16, dtype=np.float32)[:5]
    vectors = _blobs(40, centers)
    params = cluster.Params(k=5, niter=30, nredo=3, method=method, neighbours=10)
    c1, a1, d1 = cluster.METHODS[method](vectors, params, seed=0)
    c2, a2, d2 = cluster.METHODS[method](vectors, params, seed=0)
    assert np.array_equal(a1, a2) and np.array_equal(c1, c2) and np.array_equal(d1, d2)
    assert c1.shape == (5, 16) and set(a1.tolist()) == set(range(5))
    for blob in range(5):  # each true blob lands in one cluster
        assert len(set(a1[blob * 40:(blob + 1) * 40].tolist())) == 1
    np.testing.assert_allclose(np.linalg.norm(c1, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(d1, 1 - np.sum(vectors * c1[a1], axis=1), atol=1e-5)


def test_spectral_clustering_follows_rings_that_kmeans_cuts_across():
    # two parallel rings of latitude +-0.15 rad on a sphere: each point's nearest neighbours lie on
    # its own ring, but the most compact split into 2 (what k-means seeks) halves the sphere by longitude
    longitude = np.random.default_rng(0).uniform(0, 2 * np.pi, 1200)
    latitude = np.repeat([0.15, -0.15], 600)
    vectors = np.stack([np.cos(latitude) * np.cos(longitude), np.cos(latitude) * np.sin(longitude),
                        np.sin(latitude)], axis=1).astype(np.float32)
    ring = np.repeat([0, 1], 600)

    def purity(assignment):
        return sum(np.bincount(ring[assignment == c]).max() for c in np.unique(assignment)) / len(ring)

    spectral = cluster.spectral(vectors, cluster.Params(k=2, method="spectral"), seed=0)[1]
    kmeans = cluster.spherical_kmeans(vectors, cluster.Params(k=2), seed=0)[1]
    assert purity(spectral) == 1.0 and purity(kmeans) < 0.7


def test_cluster_keys_of_kmeans_runs_hold_no_spectral_settings():
    kmeans, spectral = tiny_config("cluster.method=kmeans"), tiny_config("cluster.method=spectral")
    assert "method" not in cluster.key_params(kmeans) and "neighbours" not in cluster.key_params(kmeans)
    assert cluster.key_params(tiny_config("cluster.method=kmeans", "cluster.neighbours=30")) == cluster.key_params(kmeans)
    assert cluster.key_params(spectral)["method"] == "spectral"
    assert cluster.key_params(tiny_config("cluster.method=spectral", "cluster.neighbours=30")) != cluster.key_params(spectral)


def test_core_filtering_keeps_the_nearest_fraction_of_each_cluster():
    assignment = np.repeat(np.arange(3), 10).astype(np.int32)
    distance = np.tile(np.arange(10, dtype=np.float32), 3)
    core = cluster.core_mask(assignment, distance, 3, 0.8)
    assert core.reshape(3, 10)[:, :8].all() and not core.reshape(3, 10)[:, 9].any()
    assert 0.8 <= core.mean() <= 0.9
    assert cluster.core_mask(assignment, distance, 3, 1.0).all()


@pytest.mark.parametrize("method", cluster.METHODS)
def test_pseudo_masks_paint_each_object_with_its_cluster_plus_one_or_ignore(images, tmp_path, method):
    keys = _run(images, tmp_path / "wd", "cluster.core_fraction=0.5", f"cluster.method={method}",
                start="pseudo_masks", only=True)
    embed, clusters, masks = (_entry(tmp_path / "wd", stage, keys) for stage in ("embed", "cluster", "pseudo_masks"))
    rows = np.load(embed / "objects.npz")
    assignment, core = np.load(clusters / "assignments.npy"), np.load(clusters / "core.npy")
    mask_of = {item["image"]: masks / item["mask"] for item in read_json(masks / "items.json")}
    store, painted = runner.Workdir(tmp_path / "wd").store, []
    for position, item in enumerate(read_json(embed / "items.json")):
        object_map, _ = objects.load_objects(objects.object_file(store, item["objects_key"]))
        with Image.open(mask_of[item["image"]]) as png:
            assert png.mode == "P" and png.size == (160, 120)
            mask = np.asarray(png)
        assert (mask[object_map == 0] == 0).all() and (mask[object_map == objects.IGNORE] == 255).all()
        mine = np.flatnonzero(rows["image_index"] == position)  # this image's objects: one row each
        assert sorted(rows["object_id"][mine]) == sorted(set(np.unique(object_map).tolist()) - {0, objects.IGNORE})
        for row in mine:
            label = assignment[row] + 1 if core[row] else 255  # core objects: their cluster + 1, the rest ignore
            assert np.unique(mask[object_map == rows["object_id"][row]]).tolist() == [label]
            painted.append(label)
    assert len(mask_of) == 10 and 255 in painted and len(set(painted) - {255}) >= 2


def test_too_few_objects_for_k_is_a_clear_error(images, tmp_path):
    with pytest.raises(InputError, match=r"cluster.k=200 but only \d+ objects"):
        _run(images, tmp_path / "wd", "cluster.k=200")

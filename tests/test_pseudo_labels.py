"""The pseudo-label ingredients on generated data: refinement, object views, projection, merging, reliability."""
from __future__ import annotations

import shutil

import cv2
import numpy as np
import pytest
import torch

from pipeline import runner
from pipeline.artifacts import read_json
from pipeline.backbones import BackboneParams, build_backbone
from pipeline.refine import RefineParams, refine_labels
from stages import cluster, embed, objects
from tests.conftest import quiet, tiny_config


def _photo_with_shapes(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(noisy photo, true mask) of a disc and a bar in their own colour on a plain background."""
    truth = np.zeros((120, 160), np.uint8)
    cv2.circle(truth, (100, 60), 35, 1, -1)
    cv2.rectangle(truth, (10, 15), (40, 105), 1, -1)
    photo = np.where(truth[..., None] > 0, np.uint8([200, 160, 60]), np.uint8([40, 90, 160]))
    noise = np.random.default_rng(seed).normal(0, 8, photo.shape)
    return np.clip(photo + noise, 0, 255).astype(np.uint8), truth


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / (a | b).sum())


@pytest.mark.parametrize("method", ["guided", "global"])
def test_refinement_snaps_a_coarse_mask_to_the_drawn_shapes_edges(method):
    photo, truth = _photo_with_shapes()
    bleeding = cv2.dilate(truth, np.ones((9, 9), np.uint8))  # 4 px past every edge
    blocky = cv2.resize(cv2.resize(truth, (10, 8), interpolation=cv2.INTER_AREA), (160, 120), interpolation=cv2.INTER_NEAREST)
    params = RefineParams(method=method, radius=0.15)  # 18 px: borders up to about half that far move
    for coarse in (bleeding, blocky):
        refined = refine_labels(photo, coarse, params)
        assert _iou(refined > 0, truth > 0) > max(0.95, _iou(coarse > 0, truth > 0) + 0.05)
        assert np.array_equal(refined, refine_labels(photo, coarse, params))  # deterministic


def test_refinement_keeps_label_values_and_does_nothing_when_off():
    photo, truth = _photo_with_shapes()
    labels = np.where(truth > 0, 7, 0).astype(np.uint8)
    labels[:, :60][labels[:, :60] == 7] = 255  # the bar is ignore, the disc label 7
    labels = cv2.dilate(labels, np.ones((5, 5), np.uint8))
    refined = refine_labels(photo, labels, RefineParams(method="guided"))
    assert set(np.unique(refined).tolist()) == {0, 7, 255} and refined.dtype == np.uint8
    assert (refined[60, 100] == 7) and (refined[60, 25] == 255) and (refined[5, 150] == 0)
    assert refine_labels(photo, labels, RefineParams()) is labels


def test_objects_refined_renumbered_and_boxed_around_their_own_pixels():
    photo, truth = _photo_with_shapes()
    mask = cv2.dilate(truth, np.ones((9, 9), np.uint8)) * 255
    mask[2:5, 150:153] = 255  # a component too small to be an object, in the objects' colour
    photo[2:5, 150:153] = (200, 160, 60)
    params = objects.Params(min_area=0.01, margin=0.0, refine=RefineParams(method="guided", radius=0.15))
    object_map, boxes = objects.find_objects(mask, params, photo)
    assert len(boxes) == 2 and set(np.unique(object_map).tolist()) == {0, 1, 2, objects.IGNORE}
    for object_id, (x0, y0, x1, y1) in enumerate(boxes, start=1):
        ys, xs = np.nonzero(object_map == object_id)
        assert (x0, y0, x1, y1) == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
    assert _iou(np.isin(object_map, [1, 2]), truth > 0) > 0.95
    coarse_boxes = objects.find_objects(mask, objects.Params(min_area=0.01, margin=0.0))[1]
    assert (boxes[:, 2:] - boxes[:, :2] < coarse_boxes[:, 2:] - coarse_boxes[:, :2]).all()  # tighter than the bleed
    with pytest.raises(ValueError, match="photo"):
        objects.find_objects(mask, params)


def test_small_components_join_the_nearest_object_or_the_background():
    mask = np.zeros((60, 100), np.uint8)
    mask[10:30, 10:30] = 255  # object 1
    mask[10:30, 70:90] = 255  # object 2
    mask[40:42, 12:14] = 255  # small, near object 1
    mask[35:37, 80:82] = 255  # small, near object 2
    base = objects.Params(min_area=0.02, margin=0.0)
    ignored = objects.find_objects(mask, base)[0]
    nearest = objects.find_objects(mask, objects.Params(min_area=0.02, margin=0.0, small_components="nearest"))[0]
    background = objects.find_objects(mask, objects.Params(min_area=0.02, margin=0.0, small_components="background"))[0]
    assert ignored[41, 13] == objects.IGNORE and ignored[36, 81] == objects.IGNORE
    assert nearest[41, 13] == 1 and nearest[36, 81] == 2
    assert background[41, 13] == 0 and background[36, 81] == 0
    for placed in (nearest, background):
        assert np.array_equal(placed[ignored != objects.IGNORE], ignored[ignored != objects.IGNORE])


def test_grey_and_blur_views_keep_the_object_and_hide_the_rest(tmp_path):
    photo, truth = _photo_with_shapes()
    object_map, boxes = objects.find_objects(truth * 255, objects.Params(min_area=0.01, margin=0.2))
    path = tmp_path / "objects.npz"
    np.savez(path, object_map=object_map, boxes=boxes)
    crops = embed._CropViews([path], 64, ("context", "grey", "blur"))(0, photo).numpy()
    assert crops.shape == (2, 3, 4, 64, 64) and crops.dtype == np.uint8
    context, grey, blur = crops[1, 0, :3], crops[1, 1, :3], crops[1, 2, :3]  # the disc, object 2
    assert (crops[1, :, 3, 32, 32] == 255).all() and (crops[1, :, 3, :4, :4] == 0).all()  # its mask rides along
    corner = (slice(None), slice(0, 4), slice(0, 4))  # outside the disc
    assert (grey[corner] == np.array(embed.GREY)[:, None, None]).all()
    assert np.abs(grey[:, 32, 32].astype(int) - context[:, 32, 32]).max() <= 1  # the object itself is kept
    assert not (blur[corner] == grey[corner]).all() and blur[corner].std() < context[corner].std()


@pytest.mark.parametrize("name", ["vit_tiny_random", "mobilenet_v2"])
def test_object_pooling_averages_the_feature_cells_the_object_covers(name):
    backbone = build_backbone(BackboneParams(name=name, weights="random" if name == "mobilenet_v2" else ""))
    images = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    masks = torch.zeros(2, 64, 64)
    masks[0, :16, 16:32] = 1  # exactly cell (0, 1) of ViT-16's 4x4 grid, a quarter of MobileNetV2's cell (0, 0)
    masks[1] = 1
    crop, pooled = backbone.crop_and_object_vectors(images, masks)
    torch.testing.assert_close(crop, backbone(images))
    with torch.inference_mode():
        x = backbone._normalize(images)
        if name == "vit_tiny_random":
            cells = backbone.trunk.forward_features(x)[:, backbone.trunk.num_prefix_tokens:]  # (2, 16, dim), row-major
            first, whole = cells[0, 1], cells[1].mean(dim=0)
        else:
            cells = backbone._final_features(x)  # (2, 1280, 2, 2)
            first, whole = cells[0, :, 0, 0], cells[1].mean(dim=(1, 2))
    torch.testing.assert_close(pooled[0], first)
    torch.testing.assert_close(pooled[1], whole)  # a mask over the whole crop pools as the crop does


def test_flip_averaged_embeddings_are_the_same_for_a_mirrored_crop():
    backbone = build_backbone(BackboneParams(name="vit_tiny_random"))
    crops = torch.randint(0, 256, (3, 2, 4, 64, 64), dtype=torch.uint8)
    mirrored = crops.flip(-1)
    flip = embed.Params(views=("context", "grey"), flip=True)
    np.testing.assert_allclose(embed._forward(backbone, crops, torch.device("cpu"), flip),
                               embed._forward(backbone, mirrored, torch.device("cpu"), flip), atol=1e-5)
    plain = embed.Params(views=("context", "grey"))
    assert not np.allclose(embed._forward(backbone, crops, torch.device("cpu"), plain),
                           embed._forward(backbone, mirrored, torch.device("cpu"), plain), atol=1e-3)


def test_layers_join_the_last_stages_each_normalised():
    backbone = build_backbone(BackboneParams(name="vit_tiny_random"))
    crops = torch.randint(0, 256, (4, 1, 3, 64, 64), dtype=torch.uint8)
    crops = torch.cat([crops, torch.full_like(crops[:, :, :1], 255)], dim=2)  # the masks channel
    last = embed._forward(backbone, crops, torch.device("cpu"), embed.Params(pooling=("crop",)))
    both = embed._forward(backbone, crops, torch.device("cpu"), embed.Params(layers=2, pooling=("crop",)))
    assert last.shape == (4, 48) and both.shape == (4, 96)
    np.testing.assert_allclose(both[:, 48:] * np.sqrt(2), last, atol=1e-5)  # the last block's part is the CLS vector
    np.testing.assert_allclose(np.linalg.norm(both[:, :48], axis=1), 1 / np.sqrt(2), atol=1e-5)


def test_embeddings_of_two_lengths_share_a_workdir(images, tmp_path):
    for layers, dim in ((2, 96), (1, 48)):  # the second finds the first one's shard first
        keys = runner.run(tiny_config(f"embed.layers={layers}", "embed.pooling=[crop]"), images, tmp_path / "wd", start="embed", only=True, log=quiet)
        assert np.load(tmp_path / "wd" / "cache" / "embed" / keys["embed"] / "embeddings.npy").shape[1] == dim


def test_whitening_separates_two_clusters_that_kmeans_alone_splits_by_a_nuisance():
    # every vector = a shared direction + a large nuisance (viewpoint, lighting) + a small class signal:
    # the cosine is dominated by the nuisance, so spherical k-means halves the nuisance's range
    rng = np.random.default_rng(0)
    n, dim = 400, 16
    classes = np.repeat([0, 1], n // 2)
    vectors = np.zeros((n, dim))
    vectors[:, 0] = 3.0
    vectors[:, 1] = rng.normal(0, 2.0, n)
    vectors[:, 2] = np.where(classes == 1, 0.4, -0.4)
    vectors[:, 3:] = rng.normal(0, 0.05, (n, dim - 3))
    unit = (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)

    def purity(assignment):
        return sum(np.bincount(classes[assignment == c]).max() for c in np.unique(assignment)) / n

    def kmeans(**projection):
        params = cluster.Params(k=2, method="kmeans", nredo=3, **projection)
        return cluster.spherical_kmeans(cluster.projected(unit, params), params, 0)[1]

    assert purity(kmeans(pca_dim=0)) < 0.6 and purity(kmeans(pca_dim=4, whiten=False)) < 0.6  # reducing alone keeps the nuisance
    assert purity(kmeans(pca_dim=4, whiten=True)) > 0.95
    reduced = cluster.projected(unit, cluster.Params(k=2, pca_dim=4, whiten=False))
    assert reduced.shape == (n, 4)
    np.testing.assert_allclose(np.linalg.norm(reduced, axis=1), 1.0, atol=1e-5)


def _rings() -> tuple[np.ndarray, np.ndarray]:
    """Two parallel rings of latitude on the sphere: k-means into 2 halves them by longitude instead."""
    longitude = np.random.default_rng(0).uniform(0, 2 * np.pi, 1200)
    latitude = np.repeat([0.15, -0.15], 600)
    vectors = np.stack([np.cos(latitude) * np.cos(longitude), np.cos(latitude) * np.sin(longitude),
                        np.sin(latitude)], axis=1).astype(np.float32)
    return vectors, np.repeat([0, 1], 600)


def test_overclusters_merged_along_the_neighbour_graph_follow_the_rings():
    vectors, ring = _rings()

    def purity(assignment):
        return sum(np.bincount(ring[assignment == c]).max() for c in np.unique(assignment)) / len(ring)

    plain = cluster.clustered(vectors, cluster.Params(k=2, method="kmeans"), 0)[1]
    merged = cluster.clustered(vectors, cluster.Params(k=2, method="kmeans", overcluster=40, neighbours=10), 0)
    centroids, assignment, distance = merged
    assert purity(plain) < 0.7 and purity(assignment) == 1.0
    assert centroids.shape == (2, 3) and set(assignment.tolist()) == {0, 1}
    np.testing.assert_allclose(distance, 1 - np.sum(vectors * centroids[assignment], axis=1), atol=1e-5)


def test_neighbour_agreement_ignores_a_mislabelled_object_that_sits_near_the_centroid():
    # cluster 0 is a wide ring around its centroid; a tight blob of cluster 1 lies inside the ring, and
    # one of its objects carries label 0: nearer to centroid 0 than any ring object, yet among 1s
    rng = np.random.default_rng(0)
    angle = rng.uniform(0, 2 * np.pi, 60)
    ring = np.stack([np.full(60, np.cos(0.3)), np.sin(0.3) * np.cos(angle), np.sin(0.3) * np.sin(angle)], axis=1)
    blob = np.array([np.cos(0.05), np.sin(0.05), 0.0]) + rng.normal(0, 0.005, (20, 3))
    unit = cluster._unit(np.concatenate([ring, blob]))
    assignment = np.repeat([0, 1], [60, 20]).astype(np.int32)
    assignment[60] = 0  # the mislabelled one
    centroids, _, distance = cluster.members_centroids(unit, assignment, 2)
    by_distance = cluster.Params(k=2, core_fraction=0.9)
    by_neighbours = cluster.Params(k=2, core_fraction=0.9, reliability="neighbours", neighbours=8)
    core_distance = cluster.core_mask(assignment, cluster.unreliability(unit, assignment, distance, by_distance), 2, 0.9)
    core_neighbours = cluster.core_mask(assignment, cluster.unreliability(unit, assignment, distance, by_neighbours), 2, 0.9)
    assert core_distance[60] and not core_neighbours[60]
    assert 0.85 <= core_neighbours.mean() <= 0.95  # still the core fraction, ties broken by distance


def test_auto_is_spectral_where_affordable_and_kmeans_beyond():
    assert cluster.resolved_method("auto", 413) == "spectral"
    assert cluster.resolved_method("auto", cluster.SPECTRAL_MAX_OBJECTS) == "spectral"
    assert cluster.resolved_method("auto", cluster.SPECTRAL_MAX_OBJECTS + 1) == "kmeans"
    assert cluster.resolved_method("kmeans", 10) == "kmeans"


def test_settings_that_do_what_version_1_did_keep_its_keys():
    legacy = tiny_config("cluster.method=kmeans", "objects.small_components=ignore", "objects.refine.method=none",
                         "embed.views=[context]", "embed.flip=false", "embed.layers=1", "cluster.pca_dim=0",
                         "cluster.overcluster=1", "cluster.reliability=distance", "embed.pooling=[crop]")
    assert set(objects.key_params(legacy)) == {"min_area", "margin", "max_objects", "one_box_per_image"}
    assert set(embed.key_params(legacy)) == {"backbone", "crop_size"}
    assert set(cluster.key_params(legacy)) == {"k", "niter", "nredo", "core_fraction", "max_points_per_centroid", "seed"}
    changed = tiny_config("objects.refine.method=guided", "embed.views=[context,grey]", "cluster.pca_dim=8",
                          "cluster.method=kmeans", "cluster.reliability=neighbours")
    assert objects.key_params(changed)["refine"]["method"] == "guided"
    assert embed.key_params(changed)["views"] == ["context", "grey"]
    assert embed.key_params(changed)["pooling"] == ["crop", "object"]  # the default since version 1's keys
    assert cluster.key_params(changed)["pca_dim"] == 8 and "neighbours" in cluster.key_params(changed)


ALL_ON = ("objects.refine.method=guided", "objects.small_components=nearest", "embed.views=[context,grey]",
          "embed.flip=true", "embed.pooling=[crop,object]", "cluster.method=auto", "cluster.pca_dim=8", "cluster.whiten=true",
          "cluster.overcluster=2", "cluster.reliability=neighbours", "cluster.neighbours=5")


def test_every_ingredient_on_is_deterministic_and_incremental(images, tmp_path):
    keys = runner.run(tiny_config(*ALL_ON), images, tmp_path / "a", start="pseudo_masks", only=True, log=quiet)
    again = runner.run(tiny_config(*ALL_ON), images, tmp_path / "b", start="pseudo_masks", only=True, log=quiet)
    assert keys == again
    masks = sorted((tmp_path / "a" / "cache" / "pseudo_masks" / keys["pseudo_masks"] / "masks").iterdir())
    assert masks and all(m.read_bytes() == (tmp_path / "b" / "cache" / "pseudo_masks" / keys["pseudo_masks"] / "masks" / m.name).read_bytes()
                         for m in masks)
    shutil.copy(images / sorted(p.name for p in images.iterdir())[0], images / "copy of the first.jpg")
    runner.run(tiny_config(*ALL_ON), images, tmp_path / "a", start="pseudo_masks", only=True, log=quiet)
    workdir = runner.Workdir(tmp_path / "a")
    manifest = read_json(workdir.latest_entry("embed") / "manifest.json")
    objects_manifest = read_json(workdir.latest_entry("objects") / "manifest.json")
    assert manifest["counts"]["computed_images"] == 1 and objects_manifest["counts"]["computed"] == 1


def test_same_photo_edges_join_an_objects_fragments_to_the_photo_they_come_from():
    # two kinds of object, A and B, 12 photos each; 4 A photos also hold a fragment whose vector lies a
    # little nearer to B's: the kNN graph alone gives the fragments to B, the photos' edges to A
    rng = np.random.default_rng(0)
    a = np.array([1.0, 0.0, 0.0]) + rng.normal(0, 0.02, (12, 3))
    b = np.array([0.0, 1.0, 0.0]) + rng.normal(0, 0.02, (12, 3))
    fragments = np.array([0.45, 0.55, 0.0]) + rng.normal(0, 0.02, (4, 3))
    unit = cluster._unit(np.concatenate([a, b, fragments]))
    photos = np.concatenate([np.arange(24), np.arange(4)])  # fragment i is in A's photo i
    with_photos = cluster.spectral(unit, cluster.Params(k=2, neighbours=6, same_photo=1.0), 0, photos)[1]
    without = cluster.spectral(unit, cluster.Params(k=2, neighbours=6, same_photo=0.0), 0, photos)[1]
    for assignment in (with_photos, without):
        assert len(set(assignment[:12])) == 1 and len(set(assignment[12:24])) == 1 and assignment[0] != assignment[12]
    assert (without[24:] == without[12]).all() and (with_photos[24:] == with_photos[0]).all()
    graph = cluster.same_photo_graph(np.array([0, 0, 1, 0, 2]))
    assert graph.toarray().tolist() == [[0, 1, 0, 1, 0], [1, 0, 0, 1, 0], [0, 0, 0, 0, 0], [1, 1, 0, 0, 0], [0, 0, 0, 0, 0]]

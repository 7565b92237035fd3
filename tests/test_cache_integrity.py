"""A damaged cache is detected on read, reported, and recomputed, never used; one writer per workdir;
a full disk stops the run with a clear error and nothing that looks finished."""
from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pipeline import artifacts, runner
from pipeline.artifacts import ArtifactStore, read_json
from pipeline.errors import StorageError
from pipeline.lock import WorkdirBusyError, workdir_lock
from tests.conftest import ROOT, tiny_config


def _run(images, workdir):
    lines = []
    keys = runner.run(tiny_config(), images, workdir, start="pseudo_masks", only=True, log=lines.append)
    return keys, {line.split()[0]: line.split()[1] for line in lines}


def _masks(workdir, keys) -> dict[str, bytes]:
    folder = Path(workdir) / "cache" / "pseudo_masks" / keys["pseudo_masks"] / "masks"
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _manifest(workdir, stage, keys):
    return read_json(Path(workdir) / "cache" / stage / keys[stage] / "manifest.json")


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.fixture
def finished(images, tmp_path):
    keys, _ = _run(images, tmp_path / "wd")
    return tmp_path / "wd", keys, _masks(tmp_path / "wd", keys)


def test_a_truncated_embeddings_array_is_recomputed(images, finished, capfd):
    workdir, keys, masks = finished
    _truncate(workdir / "cache" / "embed" / keys["embed"] / "embeddings.npy")
    again, done = _run(images, workdir)
    assert "embeddings.npy" in capfd.readouterr().err and again == keys
    assert done["saliency"] == done["objects"] == "cached" and done["embed"] == "computed"
    assert _manifest(workdir, "embed", keys)["counts"]["computed_images"] == 0  # its shards were intact
    assert _masks(workdir, keys) == masks


def test_a_deleted_saliency_mask_is_recomputed_for_that_image_only(images, finished, capfd):
    workdir, keys, masks = finished
    used = sorted(_manifest(workdir, "saliency", keys)["uses"])
    (workdir / "cache" / "saliency" / used[0]).unlink()
    _, done = _run(images, workdir)
    assert f"{used[0]}: missing" in capfd.readouterr().err
    assert done["saliency"] == "computed" and done["objects"] == "cached"
    assert _manifest(workdir, "saliency", keys)["counts"]["computed"] == 1
    assert _masks(workdir, keys) == masks


def test_a_damaged_embedding_shard_is_recomputed_when_embed_reruns(images, finished, capfd):
    workdir, keys, masks = finished
    shard = next(name for name in _manifest(workdir, "embed", keys)["uses"] if name.endswith(".npy"))
    _truncate(workdir / "cache" / "embed" / shard)
    (workdir / "cache" / "embed" / keys["embed"] / "embeddings.npy").unlink()  # so embed must rerun
    _, done = _run(images, workdir)
    assert shard in capfd.readouterr().err and done["embed"] == "computed"
    assert _manifest(workdir, "embed", keys)["counts"]["computed_images"] > 0
    assert _masks(workdir, keys) == masks


def test_an_edited_manifest_is_not_trusted(images, finished, capfd):
    workdir, keys, masks = finished
    path = workdir / "cache" / "cluster" / keys["cluster"] / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["params"]["k"] = 99
    path.write_text(json.dumps(manifest))
    _, done = _run(images, workdir)
    assert "manifest.json: edited" in capfd.readouterr().err
    assert done["embed"] == "cached" and done["cluster"] == "computed"
    assert _manifest(workdir, "cluster", keys)["params"]["k"] != 99
    assert _masks(workdir, keys) == masks


def test_a_changed_pseudo_mask_of_the_same_size_is_caught_by_its_checksum(images, finished):
    workdir, keys, _ = finished
    store = ArtifactStore(workdir / "cache", repair=True)
    mask = sorted((store.entry("pseudo_masks", keys["pseudo_masks"]) / "masks").iterdir())[0]
    data = bytearray(mask.read_bytes())
    data[-20] ^= 0xFF
    mask.write_bytes(bytes(data))
    assert store.verify("pseudo_masks", keys["pseudo_masks"]) == {f"masks/{mask.name}": "content changed (sha256)"}
    assert store.lookup("pseudo_masks", keys["pseudo_masks"]) is None
    assert not store.entry("pseudo_masks", keys["pseudo_masks"]).exists()


def test_older_entries_sharing_per_image_results_hash_each_file_once(images, finished, monkeypatch):
    workdir, keys, _ = finished
    shutil.copy(images / sorted(os.listdir(images))[0], images / "added.jpg")
    _run(images, workdir)  # a second entry per stage, sharing the first's per-image results
    (images / "added.jpg").unlink()
    shutil.copy(images / sorted(os.listdir(images))[1], images / "added_too.jpg")
    hashed = []
    real_sha256 = artifacts.file_sha256
    monkeypatch.setattr(artifacts, "file_sha256", lambda path: hashed.append(str(path)) or real_sha256(path))
    _run(images, workdir)  # before reusing per-image results, both older entries of each stage are verified
    items = [name for name in hashed if "/items/" in name]
    assert len(items) >= 2 * 10 and len(items) == len(set(items))  # 10 images' masks and objects at least


def test_a_clean_entry_verifies(finished):
    workdir, keys, _ = finished
    store = ArtifactStore(workdir / "cache")
    assert all(store.verify(stage, keys[stage]) == {} for stage in runner.STAGE_NAMES[:-1])
    assert np.load(store.entry("embed", keys["embed"]) / "embeddings.npy").shape[0] > 0


def test_a_second_writer_on_the_same_workdir_is_refused_and_a_dead_holders_lock_is_taken_over(tmp_path):
    # The holder forks a child that outlives it, as DataLoader workers do when their parent is killed.
    holder = subprocess.Popen([sys.executable, "-c", (
        "import os, sys, time; sys.path.insert(0, sys.argv[1]); from pipeline.lock import workdir_lock\n"
        "with workdir_lock(sys.argv[2]):\n"
        "    child = os.fork()\n"  # the child says its pid once it runs, past the fork hook that closes its copy
        "    if child == 0:\n        print(os.getpid(), flush=True); time.sleep(60); os._exit(0)\n"
        "    time.sleep(60)"), str(ROOT), str(tmp_path)],
        stdout=subprocess.PIPE, text=True)
    child = None
    try:
        child = int(holder.stdout.readline())
        with pytest.raises(WorkdirBusyError, match=rf"{tmp_path} is in use by pid {holder.pid} "):
            with workdir_lock(tmp_path):
                pass
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
        with workdir_lock(tmp_path):  # the dead holder's lock is taken over while its child lives on
            assert f"pid {os.getpid()}" in (tmp_path / "lock").read_text()
        assert (tmp_path / "lock").read_text() == ""
    finally:
        holder.kill()
        if child:
            os.kill(child, signal.SIGKILL)


def test_a_holder_that_removes_the_lock_file_meanwhile_still_gives_a_busy_error(tmp_path, monkeypatch):
    # Two torchrun ranks rejected at once both tidy their fresh workdir: one holds the lock and unlinks
    # the file after the other opened it, but before the other's flock fails (CI saw a FileNotFoundError).
    from pipeline import lock

    (tmp_path / "lock").write_text("pid 1 (run_pipeline.py run, since 02:44:35)")

    def flock_held_then_unlinked(fd, operation):
        (tmp_path / "lock").unlink()
        raise BlockingIOError(11, "Resource temporarily unavailable")

    monkeypatch.setattr(lock.fcntl, "flock", flock_held_then_unlinked)
    with pytest.raises(WorkdirBusyError, match=r"in use by pid 1 \(run_pipeline.py run"):
        with workdir_lock(tmp_path):
            pass


def test_the_runner_holds_the_workdir_lock(images, tmp_path):
    with workdir_lock(tmp_path / "wd"):
        with pytest.raises(WorkdirBusyError):
            _run(images, tmp_path / "wd")


# the disk fills at a saliency mask, at the saliency entry's manifest, at an embedding shard
@pytest.mark.parametrize("failing_write, stage_writing", [(3, "saliency"), (12, "saliency"), (26, "embed")])
def test_a_full_disk_stops_with_a_clear_error_and_no_finished_looking_entry(images, tmp_path, monkeypatch, failing_write,
                                                                             stage_writing):
    real_replace, writes = os.replace, []

    def replace_until_the_disk_is_full(src, dst):  # every cache file is renamed into place by atomic_write
        writes.append(dst)
        if len(writes) >= failing_write:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(dst))
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace_until_the_disk_is_full)
    with pytest.raises(StorageError, match=rf"no space left on the device while stage {stage_writing} wrote .*run the same command"):
        _run(images, tmp_path / "wd")
    monkeypatch.setattr(os, "replace", real_replace)
    store = ArtifactStore(tmp_path / "wd" / "cache")
    finished_before = runner.STAGE_NAMES[:runner.STAGE_NAMES.index(stage_writing)]
    for stage in runner.STAGE_NAMES:
        folder = store.root / stage
        leftovers = [p.name for p in folder.iterdir() if p.name != "items"] if folder.is_dir() else []
        looks_finished = [name for name in leftovers if (folder / name / "manifest.json").is_file()]
        assert len(looks_finished) == (stage in finished_before)  # the stages before kept their entry, none after
        assert all(store.verify(stage, name) == {} for name in looks_finished)  # what looks finished is finished
        assert not [name for name in leftovers if ".tmp-" in name]  # the failed attempt's folder is gone
    keys, done = _run(images, tmp_path / "wd")  # with space again, the run finishes from where it stopped
    assert store.lookup("pseudo_masks", keys["pseudo_masks"])
    assert [stage for stage in finished_before if done[stage] != "cached"] == []

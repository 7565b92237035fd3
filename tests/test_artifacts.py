"""pipeline.artifacts: stable hashes, atomic writes and the content-addressed ArtifactStore."""
from __future__ import annotations

import json
import os
import socket

import numpy as np
import pytest

from pipeline.artifacts import (KEY_LENGTH, MANIFEST, ArtifactStore, atomic_write, read_json, save_npy, stable_hash,
                                write_json, writer_tag)
from pipeline.errors import CacheCorruptError


def dead_pid() -> int:
    """A pid that no process has (checked with os.kill)."""
    for pid in (999999, 999998, 4_000_000, 4_194_000):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return pid
        except PermissionError:
            continue
    pytest.skip("no free pid found")


# ---------------------------------------------------------------- stable_hash


def test_stable_hash_ignores_dict_key_order():
    a = {"stage": "cluster", "params": {"k": 20, "niter": 300}, "upstream": {"embed": "x"}}
    b = {"upstream": {"embed": "x"}, "params": {"niter": 300, "k": 20}, "stage": "cluster"}
    assert stable_hash(a) == stable_hash(b)


def test_stable_hash_changes_with_values():
    base = stable_hash({"params": {"k": 20}})
    assert stable_hash({"params": {"k": 21}}) != base
    assert stable_hash({"params": {"k": "20"}}) != base  # type matters
    assert stable_hash({"params": {"kk": 20}}) != base
    assert stable_hash({"params": {"k": 20}, "extra": None}) != base
    assert stable_hash([1, 2]) != stable_hash([2, 1])  # list order matters


def test_stable_hash_is_deterministic_and_short_hex():
    value = stable_hash({"a": [1, 2.5, "x", None, True]})
    assert value == stable_hash({"a": [1, 2.5, "x", None, True]})
    assert len(value) == KEY_LENGTH
    int(value, 16)
    # a fixed value: the key must not depend on the process (e.g. on hash randomisation)
    assert stable_hash({"b": 1, "a": 2}) == stable_hash({"a": 2, "b": 1})
    import hashlib
    assert stable_hash({"b": 1, "a": 2}) == hashlib.sha256(b'{"a":2,"b":1}').hexdigest()[:KEY_LENGTH]


# ---------------------------------------------------------------- atomic_write


def test_atomic_write_writes_the_target(tmp_path):
    target = tmp_path / "sub" / "out.txt"
    assert atomic_write(target, lambda tmp: tmp.write_text("hello")) == target
    assert target.read_text() == "hello"
    assert sorted(p.name for p in target.parent.iterdir()) == ["out.txt"]


def test_atomic_write_failure_leaves_neither_target_nor_temp(tmp_path):
    target = tmp_path / "out.bin"

    def writer(tmp):
        tmp.write_bytes(b"partial")
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError, match="disk on fire"):
        atomic_write(target, writer)
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []


def test_atomic_write_failure_keeps_the_previous_version(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")

    def writer(tmp):
        tmp.write_text("new but incomplete")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, writer)
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]


def test_json_and_npy_helpers(tmp_path):
    write_json(tmp_path / "a.json", {"b": (1, 2), "a": "x"})
    assert read_json(tmp_path / "a.json") == {"a": "x", "b": [1, 2]}
    array = np.arange(6, dtype=np.float32).reshape(2, 3)
    save_npy(tmp_path / "a.npy", array)
    np.testing.assert_array_equal(np.load(tmp_path / "a.npy"), array)
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(CacheCorruptError, match="broken.json"):
        read_json(tmp_path / "broken.json")
    with pytest.raises(CacheCorruptError):
        read_json(tmp_path / "missing.json")


# ---------------------------------------------------------------- ArtifactStore


def test_begin_lookup_commit(tmp_path):
    store = ArtifactStore(tmp_path / "cache")
    key = stable_hash({"stage": "embed", "n": 1})
    assert store.lookup("embed", key) is None

    tmp = store.begin("embed", key)
    assert tmp.is_dir()
    assert tmp.parent == tmp_path / "cache" / "embed"
    assert tmp.name == f"{key}.tmp-{socket.gethostname()}-{os.getpid()}"
    (tmp / "vectors.bin").write_bytes(b"\x00" * 10)
    assert store.lookup("embed", key) is None  # not finished until commit
    assert store.finished_keys("embed") == []

    final = store.commit("embed", key, tmp, {"params": {"batch_size": 64}})
    assert final == store.entry("embed", key) == tmp_path / "cache" / "embed" / key
    assert store.lookup("embed", key) == final
    assert not tmp.exists()
    assert (final / "vectors.bin").read_bytes() == b"\x00" * 10

    manifest = json.loads((final / MANIFEST).read_text())
    assert manifest["stage"] == "embed"
    assert manifest["key"] == key
    assert manifest["params"] == {"batch_size": 64}
    assert {"python", "numpy", "torch"} <= set(manifest["versions"])
    assert store.manifest("embed", key) == manifest
    assert store.size_bytes("embed", key) == 10 + (final / MANIFEST).stat().st_size
    assert [p.name for p in (tmp_path / "cache" / "embed").iterdir()] == [key]  # no temp leftovers


def test_commit_of_an_entry_that_finished_meanwhile_keeps_the_first(tmp_path):
    store = ArtifactStore(tmp_path)
    first = store.begin("cluster", "k1")
    (first / "x").write_text("first")
    store.commit("cluster", "k1", first, {})
    second = store.begin("cluster", "k1")
    (second / "x").write_text("second")
    final = store.commit("cluster", "k1", second, {})
    assert (final / "x").read_text() == "first"
    assert not second.exists()


def test_directory_without_manifest_is_not_an_entry(tmp_path):
    store = ArtifactStore(tmp_path)
    half = tmp_path / "saliency" / "abc"
    half.mkdir(parents=True)
    (half / "masks.npy").write_bytes(b"half written")
    assert store.lookup("saliency", "abc") is None
    assert store.finished_keys("saliency") == []
    (half / MANIFEST).mkdir()  # not even a directory named like the manifest counts
    assert store.lookup("saliency", "abc") is None


def test_begin_removes_leftovers_of_dead_processes(tmp_path):
    store = ArtifactStore(tmp_path)
    folder = tmp_path / "objects"
    pid = dead_pid()
    dead = folder / f"k1.{writer_tag(pid)}"
    dead.mkdir(parents=True)
    (dead / "partial.npy").write_bytes(b"x")
    unnamed_host = folder / f"k1.tmp-{pid}"  # named before hosts were: this host's
    unnamed_host.mkdir()
    own = folder / f"k1.{writer_tag()}"  # an earlier attempt of this very process
    own.mkdir()
    (own / "stale").write_text("stale")
    alive = folder / f"k1.{writer_tag(os.getppid())}"  # another live process may still be writing
    alive.mkdir()
    other_key = folder / f"k2.{writer_tag(pid)}"  # leftovers of other keys are left to their own begin()
    other_key.mkdir()

    tmp = store.begin("objects", "k1")
    assert tmp == own
    assert tmp.is_dir() and list(tmp.iterdir()) == []  # fresh
    assert not dead.exists() and not unnamed_host.exists()
    assert alive.exists()
    assert other_key.exists()


def test_begin_leaves_another_hosts_leftovers_alone(tmp_path):
    """Under torchrun on several machines sharing the cache, a pid that is dead here may be writing there."""
    store = ArtifactStore(tmp_path)
    elsewhere = tmp_path / "objects" / f"k1.tmp-node-07.cluster-{dead_pid()}"  # hosts may hold dashes and dots
    elsewhere.mkdir(parents=True)
    (elsewhere / "partial.npy").write_bytes(b"x")
    store.begin("objects", "k1")
    assert (elsewhere / "partial.npy").is_file()


def test_finished_keys_newest_first(tmp_path):
    store = ArtifactStore(tmp_path)
    for key in ("old", "mid", "new"):
        store.commit("cluster", key, store.begin("cluster", key), {})
    for seconds, key in ((1_000, "old"), (2_000, "mid"), (3_000, "new")):
        ns = (1_700_000_000 + seconds) * 1_000_000_000
        os.utime(tmp_path / "cluster" / key / MANIFEST, ns=(ns, ns))
    (tmp_path / "cluster" / "unfinished").mkdir()  # no manifest
    leftover = store.begin("cluster", "pending")  # still being written
    (leftover / MANIFEST).write_text("{}")  # even with its manifest written, not yet renamed
    (tmp_path / "cluster" / "items").mkdir()  # per-image results folder
    assert store.finished_keys("cluster") == ["new", "mid", "old"]

    ns = (1_700_000_000 + 9_000) * 1_000_000_000
    os.utime(tmp_path / "cluster" / "old" / MANIFEST, ns=(ns, ns))
    assert store.finished_keys("cluster") == ["old", "new", "mid"]


def test_finished_keys_of_an_unknown_stage(tmp_path):
    assert ArtifactStore(tmp_path / "nothing").finished_keys("embed") == []


def test_items_folder_is_per_stage(tmp_path):
    store = ArtifactStore(tmp_path)
    assert store.items("saliency") == tmp_path / "saliency" / "items"
    assert store.items("saliency") != store.items("objects")

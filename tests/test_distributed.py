"""The whole pipeline under torchrun (gloo on the CPU): the same bytes as one process, on one machine or two
"nodes", resumed after a kill with another number of processes; and the device in the keys (GPU paths
checked on the CPU)."""
from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from pipeline import distributed
from pipeline.artifacts import read_json
from pipeline.context import Context
from pipeline.outputs import load_embeddings, mask_file, read_items
from pipeline.runner import Workdir
from stages import saliency
from tests.conftest import ROOT, TINY

CLI = [sys.executable, str(ROOT / "run_pipeline.py")]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]


def _env() -> dict:
    return {**os.environ, "OBJSEG_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def _pipeline(command: str, images: Path, workdir: Path) -> list[str]:
    words = command.split()  # the command's own overrides come after TINY's, so they win
    return ["run_pipeline.py", *[w for w in words if "=" not in w], "--images", str(images), "--workdir", str(workdir),
            *TINY, *[w for w in words if "=" in w]]


def _single(command: str, images: Path, workdir: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *_pipeline(command, images, workdir)], cwd=ROOT, env=_env(),
                          capture_output=True, text=True)


def _torchrun(processes: int, command: str, images: Path, workdir: Path) -> subprocess.CompletedProcess:
    return subprocess.run([*TORCHRUN, "--standalone", f"--nproc_per_node={processes}", *_pipeline(command, images, workdir)],
                          cwd=ROOT, env=_env(), capture_output=True, text=True)


def _bytes(workdir: Path) -> dict[str, bytes]:
    """What must not depend on the number of processes: saliency masks, embeddings, pseudo masks."""
    entry = Workdir(workdir).latest_entry
    found = {f"pseudo_masks/{p.name}": p.read_bytes() for p in sorted((entry("pseudo_masks") / "masks").rglob("*.png"))}
    found["embeddings"] = np.asarray(load_embeddings(entry("embed"))).tobytes()
    return found | {f"saliency/{image}": mask for image, mask in _masks(workdir).items()}


def _manifest(workdir: Path, stage: str) -> dict:
    return read_json(Workdir(workdir).latest_entry(stage) / "manifest.json")


@pytest.fixture
def twenty(images) -> Path:
    """20 synthetic photos and one that does not decode, which every run must skip and count alike."""
    for i in range(10):
        shutil.copy(images / f"shape_{i:04d}.jpg", images / f"copy_{i:04d}.jpg")
    (images / "garbage.jpg").write_bytes(b"not a jpeg at all")
    return images


def test_a_share_is_every_world_th_image():
    shares = [distributed.Share(rank, 3) for rank in range(3)]
    assert [[i for i in range(8) if s.holds(i)] for s in shares] == [[0, 3, 6], [1, 4, 7], [2, 5]]
    assert all(distributed.WHOLE.holds(i) for i in range(8))


def test_a_ranks_share_is_quiet_about_bad_images_rank_zero_reports_them(tiny_ctx, capsys):
    tiny_ctx.share = distributed.Share(1, 2)
    tiny_ctx.skip("a.jpg", "cannot decode")
    assert capsys.readouterr().err == "" and tiny_ctx.skipped == [{"image": "a.jpg", "reason": "cannot decode"}]


@pytest.fixture
def tiny_ctx(tmp_path):
    from tests.conftest import tiny_config
    return Context(tiny_config(), [], None, tmp_path, {}, None)


def test_the_barrier_timeout_is_a_day_unless_set(monkeypatch):
    monkeypatch.delenv(distributed.BARRIER_TIMEOUT_ENV, raising=False)
    assert distributed.barrier_timeout().total_seconds() == 24 * 3600
    monkeypatch.setenv(distributed.BARRIER_TIMEOUT_ENV, "7200")
    assert distributed.barrier_timeout().total_seconds() == 7200
    monkeypatch.setenv(distributed.BARRIER_TIMEOUT_ENV, "an hour")
    with pytest.raises(distributed.ConfigError, match="OBJSEG_BARRIER_TIMEOUT='an hour'"):
        distributed.barrier_timeout()


@pytest.mark.slow
def test_two_processes_give_a_single_processs_bytes(twenty, tmp_path):
    single = _single("run", twenty, tmp_path / "one")
    assert single.returncode == 0, single.stderr
    both = _torchrun(2, "run", twenty, tmp_path / "two")
    assert both.returncode == 0, both.stderr[-3000:]
    assert _bytes(tmp_path / "two") == _bytes(tmp_path / "one")
    saliency = _manifest(tmp_path / "two", "saliency")
    # every image computed once, by one of the ranks; the bad one skipped and counted once, printed once
    assert saliency["processes"] == 2 and saliency["counts"]["computed"] == 20
    assert saliency["skipped"] == _manifest(tmp_path / "one", "saliency")["skipped"] != []
    assert both.stderr.count("skipped garbage.jpg") == 1
    assert _manifest(tmp_path / "two", "train")["counts"]["processes"] == 2  # training stays DDP
    # every stage but training is rank 0's entry, with the keys one process gives
    assert read_json(tmp_path / "two" / "state.json")["keys"] == read_json(tmp_path / "one" / "state.json")["keys"]
    # predict shards the photos too: the same masks as one process, the bad photo skipped and reported once
    checkpoint = Workdir(tmp_path / "one").latest_entry("train") / "latest.pt"
    predicted = {}
    for processes in (1, 2):
        command = ["run_pipeline.py", "predict", "--checkpoint", str(checkpoint), "--images", str(twenty),
                   "--out", str(tmp_path / f"predict{processes}")]
        launcher = [*TORCHRUN, "--standalone", f"--nproc_per_node={processes}"] if processes > 1 else [sys.executable]
        done = subprocess.run([*launcher, *command], cwd=ROOT, env=_env(), capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-3000:]
        assert done.stdout.count("predicted 20 images (20 in all)") == 1 and done.stderr.count("skipped garbage.jpg") == 1
        predicted[processes] = {p.name: p.read_bytes() for p in sorted((tmp_path / f"predict{processes}" / "masks").glob("*"))}
        assert read_json(tmp_path / f"predict{processes}" / "predict.json")["skipped"][0]["image"] == "garbage.jpg"
    assert len(predicted[2]) == 20 and predicted[2] == predicted[1]


def _rank_pids(launcher: int) -> dict[int, int]:
    """rank -> pid of the worker processes torchrun started (its children with RANK in their environment)."""
    found = {}
    for proc in Path("/proc").iterdir():
        try:
            if not proc.name.isdigit() or int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1]) != launcher:
                continue
            env = dict(v.split("=", 1) for v in (proc / "environ").read_text().split("\0") if "=" in v)
        except OSError:
            continue
        if "RANK" in env:
            found[int(env["RANK"])] = int(proc.name)
    return found


@pytest.mark.slow
def test_a_rank_killed_mid_saliency_then_one_process_finishes_with_the_same_bytes(twenty, tmp_path):
    reference = _single("stage pseudo_masks --only", twenty, tmp_path / "one")
    assert reference.returncode == 0, reference.stderr
    workdir = tmp_path / "two"
    launcher = subprocess.Popen([*TORCHRUN, "--standalone", "--nproc_per_node=2",
                                 *_pipeline("stage pseudo_masks --only", twenty, workdir)],
                                cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    masks = workdir / "cache" / "saliency" / "items"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and len(list(masks.glob("*.png"))) < 3:
        time.sleep(0.01)
    os.kill(_rank_pids(launcher.pid)[1], signal.SIGKILL)  # torchrun then stops rank 0 too
    _, stderr = launcher.communicate(timeout=120)
    assert launcher.returncode != 0
    kept = len(list(masks.glob("*.png")))
    assert 3 <= kept < 20 and not list((workdir / "cache").glob("saliency/*/manifest.json")), stderr[-2000:]
    resumed = _single("stage pseudo_masks --only", twenty, workdir)
    assert resumed.returncode == 0, resumed.stderr
    assert _manifest(workdir, "saliency")["counts"]["computed"] == 20 - kept  # finished masks were kept
    assert _bytes(workdir) == _bytes(tmp_path / "one")


def _readme_sbatch() -> str:
    """The sbatch script of the README's SLURM section."""
    text = (ROOT / "README.md").read_text()
    return re.search(r"```bash\n(#!/bin/bash\n#SBATCH.*?)```", text, re.S).group(1)


FAKE_SRUN = """#!/bin/bash
# srun with --ntasks-per-node=1: the command once per node, each task with its node's SLURM variables
pids=()
for ((node = 0; node < SLURM_NNODES; node++)); do
  SLURM_NODEID=$node SLURM_PROCID=$node SLURM_LOCALID=0 "$@" &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit $status
"""
FAKE_SCONTROL = """#!/bin/bash
[ "$1 $2" = "show hostnames" ] && printf 'localhost\\nlocalhost\\n'
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_the_readmes_slurm_script_on_two_loopback_nodes_gives_a_single_processs_bytes(twenty, tmp_path):
    """Two torchrun launchers (one per "node", one process each) joined by the c10d rendezvous on loopback, as
    the README's sbatch script starts them from a typical SLURM environment, share one workdir."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    (tmp_path / "objseg.sbatch").write_text(_readme_sbatch())
    slurm = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "objseg", "SLURM_NNODES": "2", "SLURM_JOB_NUM_NODES": "2",
             "SLURM_JOB_NODELIST": "gpu[01-02]", "SLURM_NTASKS_PER_NODE": "1", "SLURM_GPUS_ON_NODE": "1",
             "SLURM_SUBMIT_DIR": str(ROOT), "MASTER_PORT": str(_free_port())}
    env = {**_env(), **slurm, "PATH": f"{bin_dir}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    nodes = subprocess.run(["bash", str(tmp_path / "objseg.sbatch"), *_pipeline("stage pseudo_masks --only", twenty,
                                                                               tmp_path / "nodes")[1:], "device=cpu"],
                           cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert nodes.returncode == 0, nodes.stderr[-3000:]
    single = _single("stage pseudo_masks --only", twenty, tmp_path / "one")
    assert single.returncode == 0, single.stderr
    assert _bytes(tmp_path / "nodes") == _bytes(tmp_path / "one")
    assert _manifest(tmp_path / "nodes", "embed")["processes"] == 2


@pytest.mark.slow
def test_self_trained_saliency_learns_one_head_from_every_ranks_seeds(images, tmp_path):
    """The head is a dataset-level step inside a per-image stage: rank 0 learns it once all seeds are stored."""
    command = "stage saliency --only saliency.method=self_trained saliency.head.iterations=20"
    single = _single(command, images, tmp_path / "one")
    assert single.returncode == 0, single.stderr
    both = _torchrun(2, command, images, tmp_path / "two")
    assert both.returncode == 0, both.stderr[-3000:]
    assert _masks(tmp_path / "two") == _masks(tmp_path / "one")
    heads = list((tmp_path / "two" / "cache" / "saliency" / "items").glob("head-*.pt"))
    # rank 0 learnt each round once and cut its 10 photos twice (the head's two seed levels); rank 1's masks, from
    # the head read back from the store, are byte-identical to those rank 0 and the single process made
    assert len(heads) == saliency.HeadParams().rounds and _manifest(tmp_path / "two", "saliency")["counts"]["spectral_computed"] == 2 * 10


def _masks(workdir: Path) -> dict[str, bytes]:
    wd = Workdir(workdir)
    return {i["image"]: mask_file(wd.store, i["key"]).read_bytes() for i in read_items(wd.latest_entry("saliency"))}


def test_an_error_rank_zero_finds_before_any_work_stops_every_rank_and_is_printed_once(images, tmp_path):
    failed = _torchrun(2, "run saliency.method=onnx", images, tmp_path / "wd")
    assert failed.returncode != 0
    assert failed.stderr.count("error: saliency.method=onnx needs saliency.model=") == 1, failed.stderr[-3000:]
    # No rank ends with a traceback or an abort. Rank 0 exits with 2, after it tidied the fresh workdir: the other
    # ranks wait for it (torchrun ends every process once one has ended, so it stops them with SIGTERM; CI saw
    # rank 0 stopped that way when rank 1 exited first). Torchrun's summary, a block per rank:
    assert "[rank" not in failed.stderr and "terminate called" not in failed.stderr
    assert re.search(r"rank\s+:\s*0 \(local_rank: 0\)\s+exitcode\s+:\s*2 \(pid", failed.stderr), failed.stderr[-3000:]
    assert not (tmp_path / "wd").exists()
    assert set(re.findall(r"exitcode\s+:\s*(-?\d+) \(pid", failed.stderr)) <= {"2", "-15"}, failed.stderr[-3000:]


def test_the_device_is_in_the_keys_only_where_a_gpu_changes_the_bytes(tmp_path):
    from stages import embed, objects, saliency
    from tests.conftest import tiny_config

    (tmp_path / "masks").mkdir()
    model = ["saliency.method=onnx", f"saliency.model={tmp_path / 'model.onnx'}"]
    cpu, gpu = tiny_config("device=cpu"), tiny_config("device=cuda")
    assert embed.key_params(gpu) == {**embed.key_params(cpu), "device": "cuda"}  # float16 autocast
    assert saliency.key_params(gpu) == {**saliency.key_params(cpu), "device": "cuda"}  # spectral: CUDA kernels
    cpu_onnx = saliency.key_params(tiny_config("device=cpu", *model))
    gpu_onnx = saliency.key_params(tiny_config("device=cuda", *model))  # run in float16 there, not widened
    assert cpu_onnx.pop("precision") == "int8" and cpu_onnx.pop("calibration") == 8
    assert gpu_onnx.pop("device") == "cuda" and cpu_onnx == gpu_onnx
    float32 = saliency.key_params(tiny_config("device=cpu", *model, "saliency.precision=float32"))
    assert float32.pop("cpu_float16_as") == "float32" and float32 == gpu_onnx
    folder = ["saliency.method=folder", f"saliency.masks_dir={tmp_path / 'masks'}"]
    assert saliency.key_params(tiny_config("device=cuda", *folder)) == saliency.key_params(tiny_config(*folder))
    assert objects.key_params(gpu) == objects.key_params(cpu)  # computed on the CPU anyway

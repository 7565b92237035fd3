"""Per-image stages (saliency, objects, embed) on 2 processes x 1 thread against 1 process x 1 thread.

    python benchmarks/distributed_per_image.py [--images 48] [--repeats 2] [section.key=value ...]

Generates the sample photos once (320x240), then, for each repeat, runs `stage embed --only` in a fresh
workdir as one process and as `torchrun --standalone --nproc_per_node=2` (gloo), alternately, both with
OMP_NUM_THREADS=1 (so torch computes on one thread per process) and no DataLoader workers. The stages'
seconds come from their manifests (rank 0 commits only after every rank's share is done, so they are
wall-clock seconds of the whole stage, process start-up excluded); the command's wall time is printed
too, and the CPU seconds all the processes of the command used (start-up included): sharing the work out
should not add to it. Prints the best of the repeats and the throughput ratio 2 processes / 1 process
(goal >= 1.8).
Default model: the demo's stand-in MobileNetV2 from ../shared/models (spectral saliency on its features).

Linux's autogroup scheduler (kernel.sched_autogroup_enabled=1) shares the CPUs between sessions, not
processes: on a machine busy with other users' sessions, the ranks of one torchrun share one session's
part and cannot run faster than one process. `--own-sessions` gives each rank its own session, as its own
GPU or node would: the 2 processes are then two launchers (`--nnodes=2`, one process each, on loopback,
each in a new session) and the single process is in a new session too.
"""
from __future__ import annotations

import argparse
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from commands.demo import make_shapes  # noqa: E402
from pipeline.artifacts import read_json  # noqa: E402
from pipeline.runner import Workdir  # noqa: E402

PER_IMAGE = ("saliency", "objects", "embed")
STAND_IN = ROOT.parent / "shared" / "models" / "mobilenetv2_imagenet_bottleneck.pt"
DEFAULTS = ["backbone.name=mobilenet_v2", f"backbone.weights={STAND_IN}", "workers=0"]
LAUNCHERS = {1: [sys.executable], 2: [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]}


def launchers(processes: int, own_sessions: bool) -> list[list[str]]:
    """The command prefixes to start together: one torchrun, or with `own_sessions` one launcher per rank."""
    if not own_sessions or processes == 1:
        return [LAUNCHERS[processes]]
    port = f"--master_port={_free_port()}"
    return [[sys.executable, "-m", "torch.distributed.run", f"--nnodes={processes}", f"--node_rank={node}",
             "--nproc_per_node=1", "--master_addr=127.0.0.1", port] for node in range(processes)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def timed_run(processes: int, images: Path, workdir: Path, overrides: list[str], own_sessions: bool) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OBJSEG_OFFLINE": "1"}
    command = [str(ROOT / "run_pipeline.py"), "stage", "embed", "--only", "--images", str(images), "--workdir",
               str(workdir), *overrides]
    started, cpu_before = time.perf_counter(), _children_cpu()
    running = [subprocess.Popen([*launcher, *command], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=own_sessions)
               for launcher in launchers(processes, own_sessions)]
    if any(p.wait() for p in running):
        raise SystemExit(f"the {processes}-process run failed: {' '.join(command)}")
    wall, cpu = time.perf_counter() - started, _children_cpu() - cpu_before
    seconds = {s: read_json(Workdir(workdir).latest_entry(s) / "manifest.json")["seconds"] for s in PER_IMAGE}
    return {"wall": wall, "cpu": cpu, "stages": sum(seconds.values()), **seconds}


def _children_cpu() -> float:
    """CPU seconds (user + system) of the finished children and theirs (torchrun's workers)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--own-sessions", action="store_true", help="each rank in its own session (see above)")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    overrides = [*DEFAULTS, *args.overrides]
    print(f"load average before: {os.getloadavg()[0]:.2f}  own sessions: {args.own_sessions}  "
          f"overrides: {' '.join(overrides)}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        images, _ = make_shapes(tmp / "data", args.images, size=(320, 240))
        best = {}
        for repeat in range(args.repeats):
            for processes in (1, 2):
                result = timed_run(processes, images, tmp / f"wd-{processes}-{repeat}", overrides, args.own_sessions)
                print(f"repeat {repeat}  {processes} process(es)  " + "  ".join(f"{k} {v:6.1f}s" for k, v in result.items())
                      + f"  load {os.getloadavg()[0]:.2f}", flush=True)
                if processes not in best or result["stages"] < best[processes]["stages"]:
                    best[processes] = result
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    print(f"\n{'':14}{'saliency':>10}{'objects':>10}{'embed':>10}{'stages':>10}{'img/s':>8}{'wall':>9}{'cpu':>9}")
    for processes, result in best.items():
        print(f"{processes} x 1 thread  " + "".join(f"{result[s]:9.1f}s" for s in (*PER_IMAGE, "stages"))
              + f"{args.images / result['stages']:8.2f}{result['wall']:8.1f}s{result['cpu']:8.1f}s")
    print(f"throughput ratio 2 processes / 1 process: {best[1]['stages'] / best[2]['stages']:.2f} "
          f"(stages), {best[1]['wall'] / best[2]['wall']:.2f} (whole command, start-up included)")


if __name__ == "__main__":
    main()

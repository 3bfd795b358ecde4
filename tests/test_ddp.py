"""Data-parallel training equals one device; a two-node run on one machine.

Every run is a CLI subprocess (DDP re-runs the command line), with callbacks from tests/helpers
on PYTHONPATH. The README section "Several GPUs or nodes" quotes what these tests measure.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
DIGITS = REPO / "configs" / "quickstart" / "digits.yaml"
HELPERS = REPO / "tests" / "helpers"
TINY = ["--model.init_args.backbone.init_args.depth=10", "--model.init_args.backbone.init_args.width=1"]
QUIET = ["--trainer.logger=false", "--trainer.enable_progress_bar=false"]
BATCH = 64  # the quickstart's batch: one process takes all of it, each of two processes half
DDP2 = ["--trainer.accelerator=cpu", "--trainer.devices=2", "--trainer.strategy=ddp"]
# torch.nn.SyncBatchNorm runs on GPUs only; on CPU this subclass of Lightning's TorchSyncBatchNorm
# plugin (same mathematics, gloo all-reduce) stands in for it. On GPUs the flag alone is enough.
SYNC_BN = ["--trainer.sync_batchnorm=true", "--trainer.plugins=gloo_sync_batchnorm.GlooSyncBatchNorm"]


def _env(**extra: str) -> dict[str, str]:
    path = os.pathsep.join(p for p in (str(HELPERS), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": path, **extra}


def _fit_three_steps(run_dir: Path, batch_size: int, *extra: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """Three optimizer steps of the quickstart (tiny backbone, no augmentation, no validation).

    Float64 (``precision=64-true``): the two sides of a comparison then differ by rounding only
    at ~1e-13, so the 1e-5 tolerance tests the mathematics. In float32 rounding differences
    (other summation orders in the all-reduce and in batch norm) grow over these three steps at
    learning rates up to 0.1 to ~1e-5 in the loss and ~4e-5 in the weights (measured), which would
    not separate a bug from rounding.
    """
    record = run_dir / "record"
    result = subprocess.run(
        [
            sys.executable, "-m", "manynets", "fit", "--config", str(DIGITS), *TINY, *QUIET,
            f"--data.init_args.batch_size={batch_size}", "--data.init_args.augment=false",
            "--trainer.deterministic=true", "--trainer.precision=64-true",
            "--trainer.limit_val_batches=0", "--trainer.max_steps=3",
            f"--trainer.default_root_dir={run_dir}", f"--checkpoint.dirpath={run_dir / 'checkpoints'}",
            "--trainer.callbacks+=record_steps.RecordSteps", f"--trainer.callbacks.init_args.out_dir={record}",
            *extra,
        ],
        cwd=run_dir.parent, env=_env(), capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    steps = json.loads((record / "steps.json").read_text())
    weights = torch.load(record / "weights.pt", weights_only=True)
    return steps, weights


def _differences(a: tuple[dict, dict], b: tuple[dict, dict]) -> tuple[float, float]:
    """Max |loss difference| over the steps, max |difference| over every float weight and BN buffer."""
    (steps_a, weights_a), (steps_b, weights_b) = a, b
    assert len(steps_a["steps"]) == len(steps_b["steps"]) == 3
    assert steps_a["total_steps"] == steps_b["total_steps"] == 3, "OneCycleLR schedule lengths differ"
    for k, (sa, sb) in enumerate(zip(steps_a["steps"], steps_b["steps"])):
        assert sa["global_step"] == sb["global_step"] == k + 1
        assert sa["lr"] == pytest.approx(sb["lr"], rel=1e-12), f"learning rate of step {k} differs"
        assert sa["labels"] == sb["labels"] and sa["image_sums"] == pytest.approx(sb["image_sums"], abs=1e-6), (
            f"step {k}: the global batches hold different images (data order differs between the runs)"
        )
    loss = max(abs(sa["loss"] - sb["loss"]) for sa, sb in zip(steps_a["steps"], steps_b["steps"]))
    assert weights_a.keys() == weights_b.keys()
    weight = max(
        (weights_a[k].double() - weights_b[k].double()).abs().max().item()
        for k in weights_a
        if weights_a[k].is_floating_point()
    )
    return loss, weight


@pytest.mark.slow
@pytest.mark.ddp
def test_ddp_with_synced_batchnorm_equals_one_device(tmp_path):
    """2 processes x B/2 with synchronised BN == 1 process x B (same images per step, same schedule)."""
    one = _fit_three_steps(tmp_path / "one", BATCH, "--trainer.accelerator=cpu", "--trainer.devices=1")
    synced = _fit_three_steps(tmp_path / "synced", BATCH // 2, *DDP2, *SYNC_BN)
    per_rank = _fit_three_steps(tmp_path / "per_rank", BATCH // 2, *DDP2)
    assert one[0]["world_size"] == 1 and synced[0]["world_size"] == per_rank[0]["world_size"] == 2
    assert all(len(s["rank_losses"]) == 2 for s in synced[0]["steps"])

    sync_loss, sync_weight = _differences(one, synced)
    rank_loss, rank_weight = _differences(one, per_rank)
    print(f"\nDDP (2 x {BATCH // 2}) vs one device ({BATCH}), 3 steps, float64:")
    print(f"  sync_batchnorm:    max |loss diff| {sync_loss:.3e}  max |weight diff| {sync_weight:.3e}")
    print(f"  per-rank BN stats: max |loss diff| {rank_loss:.3e}  max |weight diff| {rank_weight:.3e}")
    assert sync_loss <= 1e-5 and sync_weight <= 1e-5
    # without sync_batchnorm each rank normalises with its half batch's statistics: not the same training
    assert rank_loss > max(1e-4, 100 * sync_loss) and rank_weight > max(1e-4, 100 * sync_weight)


NODES_TIMEOUT_S = 300


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.ddp
def test_two_nodes_on_one_machine_train_on_disjoint_shards(tmp_path):
    """``num_nodes=2``: two CLI processes started by hand (Lightning's LightningEnvironment).

    With ``LOCAL_RANK`` set, LightningEnvironment.creates_processes_externally is true, so Lightning
    launches nothing itself; each process reads ``NODE_RANK`` (global rank = node rank x devices +
    local rank), ``MASTER_ADDR`` and ``MASTER_PORT``. Every node must be started, as on a cluster.
    """
    port = _free_port()
    procs: list[subprocess.Popen] = []
    logs = []
    try:
        for node in (0, 1):
            run_dir = tmp_path / f"node{node}"
            (run_dir / "shards").mkdir(parents=True)
            log = open(run_dir / "log.txt", "w")
            logs.append(log)
            env = _env(
                MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), NODE_RANK=str(node), WORLD_SIZE="2", LOCAL_RANK="0"
            )
            procs.append(
                subprocess.Popen(
                    [
                        sys.executable, "-m", "manynets", "fit", "--config", str(DIGITS), *TINY, *QUIET,
                        "--trainer.accelerator=cpu", "--trainer.devices=1", "--trainer.num_nodes=2",
                        "--trainer.strategy=ddp", "--trainer.max_epochs=1", "--trainer.limit_train_batches=2",
                        "--trainer.limit_val_batches=0",
                        "--data.init_args.val_split=181",  # 1256 training images: two shards of 628, no padding
                        f"--trainer.default_root_dir={run_dir}", f"--checkpoint.dirpath={run_dir / 'checkpoints'}",
                        "--trainer.callbacks+=record_shard.RecordShard",
                        f"--trainer.callbacks.init_args.out_dir={run_dir / 'shards'}",
                    ],
                    cwd=run_dir, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                )
            )
        deadline = time.monotonic() + NODES_TIMEOUT_S  # stop waiting at the deadline or as soon as one node fails
        while time.monotonic() < deadline:
            codes = [p.poll() for p in procs]
            if all(c is not None for c in codes) or any(c not in (None, 0) for c in codes):
                break
            time.sleep(0.5)
    finally:
        for proc in procs:  # on a failure or a timeout: no process left behind
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        for log in logs:
            log.close()
    failed = {node: proc.returncode for node, proc in enumerate(procs) if proc.returncode != 0}
    assert not failed, "\n".join(  # exit -9: stopped at the deadline or when the other node failed
        f"node {node}: exit {code}\n" + (tmp_path / f"node{node}" / "log.txt").read_text()[-2500:]
        for node, code in failed.items()
    )

    # node n is global rank n (one device per node), and each wrote only its own shard
    shards = []
    for node in (0, 1):
        files = sorted(p.name for p in (tmp_path / f"node{node}" / "shards").iterdir())
        assert files == [f"rank{node}_epoch0.json"], files
        shards.append(json.loads((tmp_path / f"node{node}" / "shards" / files[0]).read_text()))
    assert all(s["world_size"] == 2 for s in shards)
    a, b = (set(s["indices"]) for s in shards)
    print(f"\ntwo nodes: shard sizes {len(a)} and {len(b)}, overlap {len(a & b)}, union {len(a | b)}")
    assert len(a) == len(b) == 628 and not a & b
    assert a | b == set(range(1256))

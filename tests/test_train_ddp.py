"""Multi-process training (sw/distributed.py): torchrun with 2 CPU processes (gloo) on tiny
runs, resume in 2-process mode, rank 0's refusal, and the single-process path untouched."""

import os
import subprocess
import sys

import pytest
import torch

from bitdet.sw import distributed
from bitdet.sw.data import make_digitscenes
from bitdet.sw.train import train

TINY = ["--method", "plain", "--train-images", "40", "--val-images", "8", "--batch-size", "8",
        "--seed", "3", "--threads", "1"]


def _torchrun(*args, cwd):
    """``torchrun --standalone --nproc-per-node 2 -m bitdet.sw train ARGS``."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["OPENBLAS_NUM_THREADS"] = "1"
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc-per-node", "2", "-m", "bitdet.sw", "train", *map(str, args)],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def _model(path):
    return torch.load(path, weights_only=True)["model"]


def test_two_processes_train_write_once_resume_and_refuse(tmp_path):
    run = _torchrun(*TINY, "--epochs", "2", "--out", tmp_path / "run", cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "2 processes (gloo), 20 training images on rank 0 (of 40); batch 4 per process, " \
        "effective batch 8; lr 0.002 (not scaled); 5 steps per epoch" in run.stdout
    # rank 0 alone logs and writes: one line per epoch, one set of checkpoints
    assert run.stdout.count("epoch 1/2:") == 1 and run.stdout.count("epoch 2/2:") == 1
    assert run.stdout.count("checkpoint: ") == 1
    names = sorted(p.name for p in (tmp_path / "run").iterdir())
    assert names == ["best.pt", "epoch_001.pt", "epoch_002.pt", "last.pt"]
    ckpt = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    history = ckpt["history"]
    assert [h["epoch"] for h in history] == [1, 2] and "val_mAP50" in history[-1]
    assert history[1]["train_loss"] < history[0]["train_loss"]      # it learns
    assert ckpt["step"] == 10

    # resumed from epoch 1 in 2-process mode: exactly the uninterrupted 2-process run
    resumed = _torchrun("--resume", tmp_path / "run" / "epoch_001.pt", "--threads", "1",
                        "--out", tmp_path / "resumed", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    written = sorted(p.name for p in (tmp_path / "resumed").iterdir())
    assert written == ["best.pt", "epoch_002.pt", "last.pt"][history[1]["val_mAP50"]
                                                             < history[0]["val_mAP50"]:]
    a, b = _model(tmp_path / "run" / "last.pt"), _model(tmp_path / "resumed" / "last.pt")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    # rank 0 refuses a folder that holds a run; every rank stops (no hang), nothing written
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "run").iterdir()}
    refused = _torchrun(*TINY, "--epochs", "1", "--out", tmp_path / "run", cwd=tmp_path)
    assert refused.returncode != 0
    assert "bitdet: error:" in refused.stderr and "already holds files" in refused.stderr
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "run").iterdir()} == before


def test_world_size_unset_or_one_is_the_single_process_path(monkeypatch, tmp_path):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert distributed.from_env() is None
    plain = train("plain", epochs=1, batch_size=16, train_count=32, val_count=0, seed=5,
                  out_dir=tmp_path / "unset", progress=False, threads=1)
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("RANK", "0")
    assert distributed.from_env() is None
    one = train("plain", epochs=1, batch_size=16, train_count=32, val_count=0, seed=5,
                out_dir=tmp_path / "one", progress=False, threads=1)
    a, b = plain.model.state_dict(), one.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert distributed.from_env() == distributed.World(2, 4, 0)


@pytest.mark.parametrize("count", [7, 40])
def test_shards_are_disjoint_and_their_union_does_not_depend_on_the_process_count(count):
    def union(size):
        shards = [distributed.scene_shard(count, 64, 3, distributed.World(r, size))
                  for r in range(size)]
        assert [len(t) for _, t in shards] == [len(distributed.shard_range(count,
                                               distributed.World(r, size))) for r in range(size)]
        return torch.cat([p for p, _ in shards])

    two, three = union(2), union(3)
    assert two.shape == (count, 1, 64, 64) and torch.equal(two, three)
    assert len({bytes(img.numpy()) for img in two}) == count       # no scene twice
    first = make_digitscenes("train", count=1, seed=distributed.scene_seed(3, 0))
    assert torch.equal(two[0, 0], torch.from_numpy(first.images[0]).float())

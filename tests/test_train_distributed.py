"""train_torchvision.py under torchrun: two CPU processes (gloo on a free loopback port) on a phantom tree.

The ranks are started the way torchrun starts them (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR,
MASTER_PORT in the environment, then the script's main), with torch.multiprocessing's spawn so that each rank can
also report what it did: the training images it was handed, its weights after optimizer steps, and every file it
created or changed under the runs folder (Python audit hooks see every open for writing, mkdir, rename, remove).
"""

from __future__ import annotations

import csv
import json
import os
import socket
import sys
import time
from pathlib import Path

import pytest
import torch
from test_train_yolo import phantom_tree

from bone_r.distributed import Dist, from_env, train_sampler
from bone_r.runs import TrainError


def test_launcher_variables_say_whether_this_is_a_rank():
    assert from_env({}) is None  # a plain `python train_torchvision.py`: one process, as before
    env = {"RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}
    dist = from_env(env)
    assert (dist.rank, dist.world_size, dist.local_rank, dist.nnodes, dist.is_main) == (1, 4, 1, 2, False)
    assert dist.record(3)["effective_batch"] == 12 and dist.launcher() == "torchrun --nnodes 2 --nproc_per_node 2"
    with pytest.raises(TrainError, match="set but not LOCAL_RANK"):
        from_env({"RANK": "0", "WORLD_SIZE": "2"})
    with pytest.raises(TrainError, match="inconsistent"):
        from_env({"RANK": "2", "WORLD_SIZE": "2", "LOCAL_RANK": "0"})


@pytest.mark.parametrize("n", [8, 7])
def test_ranks_share_the_single_process_order_exactly_once(n):
    """Rank r takes positions r, r+W, ... of the order one process would use (randperm seeded seed*1000+epoch);
    an uneven count is padded with the first images so both ranks take as many steps."""
    data = list(range(n))
    for epoch in (0, 3):
        alone = torch.randperm(n, generator=torch.Generator().manual_seed(5000 + epoch)).tolist()
        shares = [list(train_sampler(data, Dist(r, 2, r, 2), 5000, epoch)) for r in range(2)]
        assert len(shares[0]) == len(shares[1]) == (n + 1) // 2
        assert [i for pair in zip(*shares) for i in pair][:n] == alone
        assert set(shares[0]) | set(shares[1]) == set(data)
        if n % 2 == 0:
            assert not set(shares[0]) & set(shares[1])


# --------------------------------------------------------------------------- two processes


def _free_ports(count: int) -> list[int]:
    socks = [socket.socket() for _ in range(count)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _written_path(event: str, args: tuple) -> str | None:
    """The path an audit event creates or changes, if it does."""
    if event == "open":
        path, mode, flags = args
        writing = any(c in mode for c in "wax+") if isinstance(mode, str) else \
            bool(flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND))
        return path if writing else None
    if event in ("os.mkdir", "os.remove", "os.rmdir", "os.truncate"):
        return args[0]
    if event == "os.rename":
        return args[1]
    return None


def _rank(rank: int, world: int, ports: list[int], runs: str, argvs: list[list[str]], report: str) -> None:
    """One rank, as torchrun would start it: the first invocation, then the --resume (a fresh port each)."""
    from torch.optim.optimizer import register_optimizer_step_post_hook

    import train_torchvision

    writes: list[str] = []

    def audit(event: str, args: tuple) -> None:
        path = _written_path(event, args)
        if isinstance(path, str | bytes | os.PathLike):
            path = os.path.abspath(os.fsdecode(path))
            if path.startswith(runs):
                writes.append(path)

    sys.addaudithook(audit)
    seen: list[tuple[int, int]] = []
    getitem = train_torchvision.DetectionSet.__getitem__

    def recorded(self, index):
        if self.train:
            seen.append((self.epoch_seed, int(index)))
        return getitem(self, index)

    train_torchvision.DetectionSet.__getitem__ = recorded
    steps: list[list[torch.Tensor]] = []
    register_optimizer_step_post_hook(
        lambda opt, *_: steps.append([p.detach().clone() for g in opt.param_groups for p in g["params"]]))
    rcs = []
    for port, argv in zip(ports, argvs):
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        rcs.append(train_torchvision.main(argv))
    torch.save({"rcs": rcs, "seen": seen, "writes": writes, "first_step": steps[0], "last_step": steps[-1],
                "steps": len(steps)}, Path(report) / f"rank{rank}.pt")


@pytest.mark.slow
def test_two_processes_train_on_disjoint_halves_in_step_and_only_rank_0_writes(tmp_path):
    import torch.multiprocessing as mp

    yaml_path = phantom_tree(tmp_path / "tree", n=12)  # 4 train, 4 val images
    runs = tmp_path / "runs"
    common = ["--project", str(runs), "--name", "ddp", "--quiet", "--cache", str(tmp_path / "cache")]
    # the first invocation stops after epoch 1 of 2; a resume extends the run to 3 and stops after epoch 2; a plain
    # resume trains epoch 3 on every rank (the extension is the run's schedule from then on)
    argvs = [["--data", str(yaml_path), "--imgsz", "64", "--epochs", "2", "--stop-after", "1", "--batch", "1",
              "--seed", "3", *common], ["--resume", "--epochs", "3", "--stop-after", "1", *common], ["--resume", *common]]
    report = tmp_path / "report"
    report.mkdir()
    ctx = mp.start_processes(_rank, args=(2, _free_ports(3), str(runs), argvs, str(report)), nprocs=2, join=False,
                             start_method="spawn")
    try:
        deadline = time.monotonic() + 240
        while not ctx.join(timeout=1):
            assert time.monotonic() < deadline, "the two ranks did not finish in 240 s"
    finally:
        for proc in ctx.processes:  # never leave a rank behind
            if proc.is_alive():
                proc.kill()
            proc.join(timeout=10)
    ranks = [torch.load(report / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert [r["rcs"] for r in ranks] == [[0, 0, 0], [0, 0, 0]]
    # each epoch's 4 training images: 2 to each rank, none to both
    for epoch_seed in (3000, 3001, 3002):
        shares = [{i for s, i in r["seen"] if s == epoch_seed} for r in ranks]
        assert len(shares[0]) == len(shares[1]) == 2 and not shares[0] & shares[1], shares
        assert shares[0] | shares[1] == {0, 1, 2, 3}
    assert len(ranks[0]["seen"]) == len(ranks[1]["seen"]) == 6
    # DDP averaged the gradients: after the first and the last step both ranks hold the same weights
    assert ranks[0]["steps"] == ranks[1]["steps"] == 6  # 2 steps of 1 image per rank and epoch, 3 epochs
    for key in ("first_step", "last_step"):
        assert len(ranks[0][key]) == len(ranks[1][key]) > 0
        for a, b in zip(ranks[0][key], ranks[1][key]):
            assert torch.equal(a, b)
    # the run folder is rank 0's alone
    assert ranks[1]["writes"] == []
    written = {Path(p).relative_to(runs).as_posix() for p in ranks[0]["writes"]}
    assert {"ddp/run.json", "ddp/args.json", "ddp/train_log.csv", "ddp/weights/last.pth", "ddp/weights/best.json"} <= written
    run = runs / "ddp"
    record = json.loads((run / "run.json").read_text())
    assert record["distributed"]["world_size"] == 2 and record["distributed"]["effective_batch"] == 2
    assert record["distributed"]["backend"] == "gloo"
    assert [r["distributed"]["world_size"] for r in record["resumed"]] == [2, 2]
    # the resumes continued the run: epochs 2 and 3 in the log, in last.pth and in the card
    with open(run / "train_log.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [(r["epoch"], r["world_size"], r["effective_batch"]) for r in rows] == [("1", "2", "2"), ("2", "2", "2"), ("3", "2", "2")]
    assert torch.load(run / "weights" / "last.pth", map_location="cpu", weights_only=True)["epoch"] == 3
    card = json.loads((run / "weights" / "best.json").read_text())
    assert card["training"]["epochs"] == 3 and card["training"]["world_size_per_invocation"] == [2, 2, 2]
    assert card["training"]["distributed"]["world_size"] == 2

"""Data-parallel training under ``torchrun``: who this process is, the process group, per-rank data and threads.

A process started by ``torchrun`` (or any launcher that sets its variables: RANK, WORLD_SIZE, LOCAL_RANK,
LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT) trains one replica of the model; `from_env` is None otherwise and the
trainer runs exactly as a single process. Rank 0 alone logs, validates and writes the run folder; it reads the run
folder for every rank too (`broadcast_result`), so only the node of rank 0 needs it. Gloo on CPU, NCCL on GPU
(one GPU per process: LOCAL_RANK). Research and teaching tool, not a diagnosis.
"""
from __future__ import annotations

import datetime as dt
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from bone_r.runs import TrainError, available_cores

LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


@dataclass(frozen=True)
class Dist:
    """This process's place in a torchrun launch."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    backend: str = ""

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def nnodes(self) -> int:
        return max(1, self.world_size // max(1, self.local_world_size))

    def launcher(self) -> str:
        """The torchrun options that give this world (for messages and the run record)."""
        return f"torchrun --nnodes {self.nnodes} --nproc_per_node {self.local_world_size}"

    def record(self, batch: int) -> dict[str, Any]:
        """What the run's files say about this launch: processes, backend, batch per process and in all."""
        return {"world_size": self.world_size, "nnodes": self.nnodes, "nproc_per_node": self.local_world_size,
                "backend": self.backend, "batch_per_process": batch, "effective_batch": batch * self.world_size,
                "launcher": self.launcher()}


def from_env(environ: dict[str, str] | None = None) -> Dist | None:
    """This process's rank and world when a launcher set RANK, WORLD_SIZE and LOCAL_RANK; None otherwise.

    Half a set of them, or values that do not fit together, is a clear error rather than a silent single process.
    """
    env = os.environ if environ is None else environ
    present = [k for k in LAUNCHER_VARS if k in env]
    if not present:
        return None
    if len(present) < len(LAUNCHER_VARS):
        missing = ", ".join(k for k in LAUNCHER_VARS if k not in env)
        raise TrainError(f"{', '.join(present)} set but not {missing}: launch with torchrun, or unset them for one process")
    try:
        rank, world, local = (int(env[k]) for k in LAUNCHER_VARS)
        local_world = int(env.get("LOCAL_WORLD_SIZE", world))
    except ValueError:
        raise TrainError("RANK, WORLD_SIZE, LOCAL_RANK and LOCAL_WORLD_SIZE must be integers") from None
    if not (world >= 1 and 0 <= rank < world and 1 <= local_world <= world and 0 <= local < local_world):
        raise TrainError(f"inconsistent launcher variables: RANK={rank} WORLD_SIZE={world} LOCAL_RANK={local} "
                         f"LOCAL_WORLD_SIZE={local_world}")
    return Dist(rank, world, local, local_world)


def wants_cuda(device: str) -> bool:
    return device.startswith("cuda") or device.isdigit()


def init(dist: Dist, device: str, timeout_min: float = 120.0) -> tuple[Dist, Any]:
    """Join the process group: NCCL with GPU LOCAL_RANK when --device asks for CUDA and it is there, else gloo on
    CPU. Returns (dist with its backend, torch.device). The timeout covers rank 0 validating while the others wait."""
    import torch
    import torch.distributed as td

    if wants_cuda(device) and torch.cuda.is_available():
        if dist.local_rank >= torch.cuda.device_count():
            raise TrainError(f"LOCAL_RANK {dist.local_rank} but only {torch.cuda.device_count()} GPU(s) visible: "
                             "use --nproc_per_node <= the GPUs per node")
        torch.cuda.set_device(dist.local_rank)
        backend, where = "nccl", torch.device("cuda", dist.local_rank)
    else:
        backend, where = "gloo", torch.device("cpu")
    if not td.is_initialized():
        td.init_process_group(backend, timeout=dt.timedelta(minutes=timeout_min),
                              **({"device_id": where} if backend == "nccl" else {}))
    return Dist(dist.rank, dist.world_size, dist.local_rank, dist.local_world_size, backend), where


def shutdown() -> None:
    import torch.distributed as td

    if td.is_available() and td.is_initialized():
        td.destroy_process_group()


def threads_per_process(dist: Dist) -> int:
    """CPU threads for each of the node's processes: its cores shared evenly (at least 1)."""
    return max(1, available_cores() // dist.local_world_size)


def train_sampler(dataset: Any, dist: Dist, seed: int, epoch: int) -> Any:
    """This rank's share of the epoch: the single process's order (randperm seeded `seed + epoch`) dealt out in
    turn, rank r taking positions r, r + W, ...; padded by repeating the first few images when the count does not
    divide (every rank takes the same number of steps)."""
    from torch.utils.data.distributed import DistributedSampler

    sampler = DistributedSampler(dataset, num_replicas=dist.world_size, rank=dist.rank, shuffle=True, seed=seed,
                                 drop_last=False)
    sampler.set_epoch(epoch)
    return sampler


def broadcast_result(dist: Dist, work: Callable[[], Any]) -> Any:
    """`work()` run on rank 0 alone and its result sent to every rank; a TrainError on rank 0 is raised on every
    rank (so none waits forever for a run folder that rank 0 refused)."""
    import torch.distributed as td

    box: list[Any] = [None]
    if dist.is_main:
        try:
            box[0] = ("ok", work())
        except TrainError as err:
            box[0] = ("error", str(err))
    td.broadcast_object_list(box, src=0)
    kind, value = box[0]
    if kind == "error":
        raise TrainError(value)
    return value


def all_finite(value: Any) -> bool:
    """Whether `value` (a loss) is finite on every rank: all skip a batch together or none does (DDP's
    gradient all-reduce needs every rank's backward)."""
    import torch
    import torch.distributed as td

    flag = torch.isfinite(value.detach()).to(torch.int32).reshape(1)
    td.all_reduce(flag, op=td.ReduceOp.MIN)
    return bool(flag.item())


def mean_over_ranks(sums: dict[str, float], count: int, device: Any) -> tuple[dict[str, float], int]:
    """Per-key sums and a batch count added up over the ranks (the log's losses are the mean over all batches)."""
    import torch
    import torch.distributed as td

    keys = sorted(sums)
    tensor = torch.tensor([sums[k] for k in keys] + [float(count)], dtype=torch.float64, device=device)
    td.all_reduce(tensor)
    values = tensor.tolist()
    return {k: values[i] for i, k in enumerate(keys)}, int(round(values[-1]))


def barrier(dist: Dist) -> None:
    import torch.distributed as td

    td.barrier()

"""Runs and the machine: run folders, seeds, CPU threads, hashes, paths shown relative to the repository.
Research and teaching tool, not a diagnosis.
"""
from __future__ import annotations

import argparse
import csv
import datetime as dt
import hashlib
import json
import math
import os
import random
import shlex
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bone_r.contract import Contract

ROOT = Path(__file__).resolve().parent.parent


def display_path(path: Path | str) -> str:
    """A path relative to the repository when inside it: cards, reports and messages never carry this machine's layout."""
    path = Path(path).resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def set_threads(threads: int) -> None:
    """Cap torch, OpenMP/MKL and the ONNX backend's new sessions (`BONE_R_ORT_THREADS`) at `threads` CPU threads.

    Call before models load. On a small shared CPU, more threads than idle cores make every OpenMP op wait for
    the busiest core (10-30x slower next to a training run), so long jobs take a --threads option.
    """
    import contextlib
    import os

    for key in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "BONE_R_ORT_THREADS"):
        os.environ[key] = str(threads)
    try:
        import torch
    except ImportError:
        return
    torch.set_num_threads(threads)
    with contextlib.suppress(RuntimeError):  # inter-op pools can only be sized before first use
        torch.set_num_interop_threads(max(1, min(threads, 2)))


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def git_commit(short: bool = False) -> str | None:
    """HEAD's hash (`short`: abbreviated), with ``+dirty`` when the working tree has changes; None outside git."""
    import subprocess

    try:
        sha = subprocess.run(["git", "rev-parse", *(["--short"] if short else []), "HEAD"], cwd=ROOT, capture_output=True,
                             text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True,
                               text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (sha + ("+dirty" if dirty else "")) if sha else None


DEFAULT_RUNS = ROOT / "runs"


DEFAULT_DATA = ROOT / "dataset.yaml"


class TrainError(Exception):
    """A problem the user can fix; printed as one line on stderr (exit code 2), never as a traceback."""


def subset(items: list[Any], fraction: float, seed: int, max_items: int | None = None) -> list[Any]:
    """A seeded random subset (order kept): `fraction` of the items, at most `max_items`, at least one."""
    keep = len(items)
    if fraction < 1.0:
        keep = max(1, round(len(items) * fraction))
    if max_items:
        keep = min(keep, max_items)
    if keep >= len(items):
        return list(items)
    rng = random.Random(seed)
    chosen = sorted(rng.sample(range(len(items)), keep))
    return [items[i] for i in chosen]


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (when installed)."""
    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    try:
        import torch

        torch.manual_seed(seed)
    except ImportError:  # pragma: no cover - torch is a dependency
        pass


def available_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def default_torch_threads() -> int:
    """Torch CPU threads for a job that shares the machine: one core fewer than available (as Ultralytics does).

    On this 2-core machine, 2 OpenMP threads next to any other busy process (a data
    loader worker, another run) make every small op wait on a descheduled thread:
    measured 10-30x slower than 1 thread. Leaving a core free avoids that.
    """
    return max(1, available_cores() - 1)


def autogroup_scheduling() -> bool:
    """True when the kernel groups CPU time by session (/proc/sys/kernel/sched_autogroup_enabled): `nice` then
    only ranks processes within one session, so niced work started elsewhere competes with the trainer as equals."""
    try:
        return Path("/proc/sys/kernel/sched_autogroup_enabled").read_text().strip() == "1"
    except OSError:
        return False


class ThreadGovernor:
    """Torch threads for a training loop: every core while the trainer has the machine to itself, one fewer
    while other processes keep a core busy (2 OpenMP threads beside a busy process run 10-30x slower than 1).
    Niced work counts too when the kernel schedules by autogroup (Linux's default: each terminal session or `setsid`
    job is one group, and `nice` only orders processes inside their own group), because then it does not yield:
    measured 2026-11-29, two niced pytest runs in other sessions took the trainer from 1.4 to 0.23 batch/s.

    `fixed` (the user's --threads) turns it off. `step()` is called once per batch; every `every` batches it
    compares the machine's busy CPU time with this process tree's own (psutil) and switches with hysteresis.
    """

    def __init__(self, fixed: int | None = None, every: int = 10, busy_above: float = 0.5, idle_below: float = 0.25):
        import torch

        self.cores = available_cores()
        self.fixed, self.every, self.busy_above, self.idle_below = fixed, every, busy_above, idle_below
        self.threads = fixed or self.cores
        self.switches = 0
        self.niced_competes = autogroup_scheduling()
        self._count = 0
        self._last: tuple[float, float, float] | None = None
        torch.set_num_threads(self.threads)

    def _sample(self) -> tuple[float, float, float]:
        import psutil

        t = psutil.cpu_times()
        kinds = ("user", "system", "irq", "softirq", "steal") + (("nice",) if self.niced_competes else ())
        busy = sum(getattr(t, k, 0.0) for k in kinds)
        return time.monotonic(), busy, self._own_cpu()

    @staticmethod
    def _own_cpu() -> float:
        import psutil

        own = 0.0
        me = psutil.Process()
        for proc in (me, *me.children(recursive=True)):
            try:
                c = proc.cpu_times()
                own += c.user + c.system
            except psutil.Error:  # a loader worker that just ended
                pass
        return own

    def others_busy(self) -> float | None:
        """Cores used by other processes since the last call (None on the first)."""
        now = self._sample()
        last, self._last = self._last, now
        if last is None or now[0] - last[0] <= 0:
            return None
        return max(0.0, (now[1] - last[1]) - (now[2] - last[2])) / (now[0] - last[0])

    def step(self) -> int:
        import torch

        if self.fixed or self.cores < 2:
            return self.threads
        self._count += 1
        if self._count % self.every:
            return self.threads
        others = self.others_busy()
        if others is None:
            return self.threads
        want = self.cores - 1 if others > self.busy_above else self.cores if others < self.idle_below else self.threads
        if want != self.threads:
            self.threads = want
            self.switches += 1
            torch.set_num_threads(want)
        return self.threads


def command_line(script: str, argv: list[str]) -> str:
    return shlex.join(["python", script, *argv])


def device_description(device: str) -> str:
    """A short, human description of where training ran (for the model card)."""
    if device.startswith("cuda") or device.isdigit() or "," in device:
        try:
            import torch

            return f"{device} ({torch.cuda.get_device_name(0)})"
        except Exception:  # noqa: BLE001 - best effort only
            return device
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"cpu ({cores} cores{', ' + cpu if cpu else ''})"


def prepare_run_dir(project: Path, name: str, *, resume: bool, exist_ok: bool) -> Path:
    """runs/<name>: must exist for --resume, must not hold a run otherwise (unless --exist-ok)."""
    run_dir = (project / name).resolve()
    if resume:
        if not (run_dir / "args.json").is_file():
            raise TrainError(f"nothing to resume: {run_dir} holds no run (no args.json)")
        return run_dir
    if (run_dir / "args.json").exists() and not exist_ok:
        raise TrainError(f"{run_dir} already holds a run; pick another --name, --resume it, or pass --exist-ok to overwrite")
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def write_run_files(run_dir: Path, script: str, argv: list[str], args: argparse.Namespace, info: Any,
                    extra: dict[str, Any], *, splits_sha256: str | None = None, splits_note: str | None = None,
                    contract: Contract | None = None) -> dict[str, Any]:
    """args.json, git_commit, splits_sha256, contract.json and run.json of a new run."""
    params = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    (run_dir / "args.json").write_text(json.dumps({"command": command_line(script, argv), "argv": argv, "args": params},
                                                  indent=2) + "\n")
    commit = git_commit() or "unknown"
    (run_dir / "git_commit").write_text(commit + "\n")
    if info is not None:
        splits_sha256 = info.splits_sha256
        splits_note = "; ".join(info.notes) or None
        contract = info.contract
    (run_dir / "splits_sha256").write_text(f"{splits_sha256 or 'null'}\n" + (f"# {splits_note}\n" if splits_note else ""))
    if contract is not None:
        contract.save(run_dir / "contract.json")
    run = {
        "script": script,
        "command": command_line(script, argv),
        "started": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "git_commit": commit,
        "dataset": None if info is None else {
            "yaml": str(info.yaml_path), "root": str(info.root), "contract_source": info.contract_source,
            "splits_csv": str(info.splits_csv) if info.splits_csv else None, "splits_sha256": info.splits_sha256,
            "notes": info.notes,
        },
        "resumed": [],
        **extra,
    }
    (run_dir / "run.json").write_text(json.dumps(run, indent=2) + "\n")
    return run


def print_json(payload: Any, out: Path | None = None, indent: int = 2) -> None:
    """A benchmark's report: printed, and written to `out` too when given (its folder made)."""
    text = json.dumps(payload, indent=indent)
    print(text)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")


def read_json(path: str | Path, what: str = "", error: type[Exception] = TrainError) -> Any:
    """The JSON value in `path`, or `error` with one sentence. With `what` (e.g. "predictions file"): '<what> not
    found: <path>' or '<path> is not valid JSON: ...'; without: 'cannot read <path>: ...' (a run's own files)."""
    path = Path(path)
    if what and not path.is_file():
        raise error(f"{what} not found: {path}")
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise error(f"{path} is not valid JSON: {err}" if what and isinstance(err, json.JSONDecodeError)
                    else f"cannot read {path}: {err}") from None


def note_resume(run_dir: Path, script: str, argv: list[str], extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Record a --resume invocation in run.json (with `extra`, e.g. a torchrun launch's processes); returns the run record."""
    run = read_json(run_dir / "run.json")
    run.setdefault("resumed", []).append({"command": command_line(script, argv), "at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
                                          "git_commit": git_commit() or "unknown", **(extra or {})})
    (run_dir / "run.json").write_text(json.dumps(run, indent=2) + "\n")
    return run


def read_train_log(run_dir: Path) -> list[dict[str, str]]:
    path = run_dir / "train_log.csv"
    if not path.is_file():
        return []
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def log_epoch(run_dir: Path, row: dict[str, Any]) -> None:
    """Add (or replace, after a resume) one epoch's row of train_log.csv."""
    rows = [r for r in read_train_log(run_dir) if str(r.get("epoch")) != str(row["epoch"])]
    rows.append({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    rows.sort(key=lambda r: int(r["epoch"]))
    fields = list(dict.fromkeys(k for r in rows for k in r))
    tmp = run_dir / "train_log.csv.tmp"
    with open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, run_dir / "train_log.csv")


def training_summary(run_dir: Path, run: dict[str, Any], seed: int, device: str) -> dict[str, Any]:
    """The card's `training` block from the run's files."""
    rows = read_train_log(run_dir)
    seconds = [float(r["seconds"]) for r in rows if r.get("seconds")]
    invocations = [run, *run.get("resumed", [])]
    launched = {"world_size_per_invocation": [inv.get("distributed", {}).get("world_size", 1) for inv in invocations]} \
        if any("distributed" in inv for inv in invocations) else {}  # a torchrun launch (bone_r.distributed) said so
    return {
        "command": run["command"],
        "resumed_with": [r["command"] for r in run.get("resumed", [])],
        "epochs": len(rows),
        "wall_time_s": round(sum(seconds), 1),
        "seconds_per_epoch": round(sum(seconds) / len(seconds), 2) if seconds else None,
        "git_commit": git_commit() or "unknown",
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "device": device_description(device),
        "seed": seed,
        **launched,
    }


def absolute(path: Path | str | None) -> Path | None:
    """An absolute path (symlinks kept), or None."""
    return None if path is None else Path(os.path.abspath(path))


def evaluate_after_training(weights: Path, data: Path, threads: int) -> int:
    """Run ``evaluate.py --weights W --data D --write-card`` with the training's CPU threads; the report and its
    plots go into the run folder (``runs/<name>/evaluate/``), beside the weights they describe."""
    report = weights.parent.parent / "evaluate" / f"{weights.stem}_test.json"
    args = ["--weights", weights, "--data", data, "--write-card", "--threads", str(threads), "--out", report]
    shown = shlex.join(["python", "evaluate.py", *(display_path(a) if isinstance(a, Path) else a for a in args)])
    print(f"evaluating: {shown}")
    done = subprocess.run([sys.executable, str(ROOT / "evaluate.py"), *map(str, args)], cwd=ROOT)
    if done.returncode:
        print(f"warning: evaluate.py exited with {done.returncode}; the card has no metrics yet. Re-run:\n  {shown}", file=sys.stderr)
    return done.returncode


def given_options(argv: list[str]) -> set[str]:
    """The long options on a command line, as argparse names them (``--stop-after=2`` -> ``stop_after``)."""
    return {a[2:].split("=", 1)[0].replace("-", "_") for a in argv if a.startswith("--")}


def restore_run_args(args: argparse.Namespace, saved: dict[str, Any], argv: list[str], changeable: set[str]) -> None:
    """On --resume: the run's saved settings, except `changeable` ones given again on this command line.

    Per-invocation options (resume, project, name, stop_after) always keep this invocation's values.
    """
    given = given_options(argv)
    for key, value in saved.items():
        if key in {"resume", "project", "name", "stop_after"} or (key in changeable and key in given):
            continue
        setattr(args, key, Path(value) if isinstance(getattr(args, key, None), Path) and value else value)


def continue_schedule(args: argparse.Namespace, ckpt: dict[str, Any], argv: list[str], run_name: str) -> None:
    """On --resume: train on to the end of the schedule last.pth was saved in (``ckpt["epochs"]``: a resume with
    --epochs N may have extended the run's first one) unless --epochs is given again; a finished schedule is refused."""
    if "epochs" in ckpt and "epochs" not in given_options(argv):
        args.epochs = int(ckpt["epochs"])
    if ckpt["epoch"] >= args.epochs:
        raise TrainError(f"{run_name} already finished {ckpt['epoch']} epoch(s); pass --epochs N > {ckpt['epoch']} to train further")


def lr_at(iteration: int, total: int, warmup: int, base: float) -> float:
    """Linear warm-up from 1% then cosine down to 1% of `base`."""
    import math

    if iteration < warmup:
        return base * (0.01 + 0.99 * iteration / max(1, warmup))
    progress = (iteration - warmup) / max(1, total - warmup)
    return base * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    """Atomic torch.save of a plain dict (tensors + JSON values): an interrupted write never leaves a broken file."""
    import torch

    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def online(host: str = "github.com", port: int = 443, timeout: float = 3.0) -> bool:
    """Whether a download could work: a short TCP probe, so nothing below can hang on a dead network.

    ``BONE_R_OFFLINE=1`` says no without trying (tests, air-gapped machines).
    """
    if os.environ.get("BONE_R_OFFLINE", "") not in ("", "0"):
        return False
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def run_cli(run: Callable[[argparse.Namespace, list[str]], int], parser: argparse.ArgumentParser,
            argv: list[str] | None) -> int:
    """The trainers' shared main(): a TrainError is one line on stderr (exit 2), Ctrl-C says how to resume."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    try:
        return run(args, argv)
    except TrainError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; continue later with --resume --name <run>", file=sys.stderr)
        return 130


def tqdm_bar(iterable, **kw):
    from tqdm import tqdm

    return tqdm(iterable, file=sys.stderr, dynamic_ncols=True, mininterval=0.5, **kw)


def finite_float(value: Any) -> float | None:
    """`value` as a finite float (a log cell, a metric), else None."""
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) else None

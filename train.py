"""Train an Ultralytics YOLO fracture detector (YOLOv8 / YOLO11) on a Bone-R dataset tree.

    python train.py --data data/merged/dataset.yaml --model yolov8n.pt --allow-scratch \\
        --epochs 100 --imgsz 640 --batch 16 --name y8n-640
    python train.py --name y8n-640 --resume            # continue an interrupted run
    python train.py ... --export onnx --evaluate        # then export ONNX and fill the card's metrics

The dataset tree (``images/{train,val,test}``, ``labels/...``, ``dataset.yaml``,
``splits.csv``, ``contract.json``) is ALREADY harmonized by ``scripts/preprocess.py``:
nothing here harmonizes again. The contract the tree was made with is recorded
in the run folder and the model card, so `inference.Predictor` applies the same
contract to raw images at prediction time.

``--model`` takes a local ``.pt``, an Ultralytics name such as ``yolov8n.pt``
(fetched when online) or an architecture ``.yaml``. When a named ``.pt`` cannot
be fetched the run stops with one clear line, unless ``--allow-scratch`` says to
train the same architecture from its ``.yaml`` without pretrained weights.

Every run folder ``runs/<name>/`` keeps ``args.json`` (all arguments and the exact
command), ``git_commit``, ``splits_sha256``, ``contract.json``, ``run.json``
(where the weights started from), ``train_log.csv`` (one row per epoch),
``weights/{best,last}.pt`` and the model card ``weights/best.json``.

This module also holds the run-folder helpers that ``train_torchvision.py`` and
``train_mura_cls.py`` share (dataset resolution, seeds, run files, model cards).
Research and teaching tool, not a diagnosis.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import os
import random
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from inference import DISCLAIMER, Contract, card_path_for, display_path, sha256_file  # noqa: E402

DEFAULT_RUNS = ROOT / "runs"
DEFAULT_DATA = ROOT / "dataset.yaml"
CLASSES = ["fracture"]
ARCH_SUFFIXES = (".yaml", ".yml")


class TrainError(Exception):
    """A problem the user can fix; printed as one line on stderr (exit code 2), never as a traceback."""


# --------------------------------------------------------------------------- shared: dataset


@dataclass
class DatasetInfo:
    """A Bone-R dataset tree resolved to absolute paths."""

    yaml_path: Path
    root: Path
    splits: dict[str, list[Path]]  # split -> image folders (absolute)
    names: list[str]
    contract: Contract
    contract_source: str
    splits_csv: Path | None
    splits_sha256: str | None
    notes: list[str] = field(default_factory=list)

    def images(self, split: str) -> list[Path]:
        """The split's images (sorted; recognized by suffix), [] when the split is absent."""
        from inference import list_images

        found: list[Path] = []
        for folder in self.splits.get(split, []):
            found.extend(list_images(folder))
        return sorted(dict.fromkeys(found))


def load_dataset(yaml_path: str | Path, contract_path: str | Path | None = None) -> DatasetInfo:
    """Read a dataset.yaml by Bone-R's convention (`evaluate.load_dataset_yaml`: a relative
    ``path:`` is relative to the yaml's folder, no ``path`` means the yaml's folder; Ultralytics
    would resolve it against its own datasets folder). ``contract.json`` is looked for in the
    yaml's folder, then in the dataset root; ``contract_path`` overrides both.
    """
    from evaluate import EvaluationError, load_dataset_yaml

    yaml_path = Path(yaml_path)
    try:
        root, data = load_dataset_yaml(yaml_path)
    except EvaluationError as err:
        raise TrainError(str(err).splitlines()[0]) from None
    if not root.is_dir():
        raise TrainError(f"the dataset root {root} (from {yaml_path}) is not a folder")
    base = Path(os.path.abspath(yaml_path)).parent
    splits: dict[str, list[Path]] = {}
    for split in ("train", "val", "test"):
        entry = data.get(split)
        if not entry:
            continue
        folders = []
        for item in entry if isinstance(entry, list) else [entry]:
            folder = Path(str(item))
            folder = folder if folder.is_absolute() else root / folder
            if not folder.is_dir():
                raise TrainError(f"{split} folder {folder} (from {yaml_path}) does not exist; Bone-R trees list image folders")
            folders.append(folder)
        splits[split] = folders
    for split in ("train", "val"):
        if split not in splits:
            raise TrainError(f"{yaml_path} has no '{split}' entry")
    names = data.get("names") or {0: "fracture"}
    names = [names[k] for k in sorted(names)] if isinstance(names, dict) else list(names)
    if contract_path is not None:
        cpath = Path(contract_path)
        if not cpath.is_file():
            raise TrainError(f"contract file not found: {cpath}")
    else:
        cpath = next((c for c in (base / "contract.json", root / "contract.json") if c.is_file()), None)
        if cpath is None:
            raise TrainError(
                f"no contract.json beside {yaml_path} or in {root}: the tree must come from scripts/preprocess.py "
                "(which writes it); pass --contract PATH to state the contract its images were made with"
            )
    try:
        contract = Contract.load(cpath)
    except (ValueError, TypeError, OSError) as err:
        raise TrainError(f"cannot read the contract {cpath}: {err}") from None
    splits_csv = next((c for c in (base / "splits.csv", root / "splits.csv") if c.is_file()), None)
    notes = []
    if splits_csv is None:
        notes.append(f"no splits.csv beside {yaml_path}: splits_sha256 is null")
    return DatasetInfo(yaml_path, root, splits, [str(n) for n in names], contract, str(cpath.resolve()), splits_csv,
                       sha256_file(splits_csv) if splits_csv else None, notes)


def label_path_for(image: Path) -> Path:
    """The YOLO label of an image: the last ``/images/`` becomes ``/labels/``, suffix ``.txt`` (Ultralytics' rule)."""
    text = str(image)
    sep_images, sep_labels = f"{os.sep}images{os.sep}", f"{os.sep}labels{os.sep}"
    if sep_images in text:
        head, tail = text.rsplit(sep_images, 1)
        text = head + sep_labels + tail
    return Path(text).with_suffix(".txt")


def read_yolo_boxes(label: Path) -> list[tuple[int, float, float, float, float]]:
    """(class, cx, cy, w, h) rows of a YOLO box label; a missing or empty file is a negative image."""
    if not label.is_file():
        return []
    rows = []
    for n, line in enumerate(label.read_text().splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 5:
            raise TrainError(f"{label}:{n}: expected 'class cx cy w h', got {len(parts)} values (polygons must be boxed by ingest)")
        try:
            cls, cx, cy, w, h = int(float(parts[0])), *(float(v) for v in parts[1:])
        except ValueError:
            raise TrainError(f"{label}:{n}: not numbers: {line.strip()!r}") from None
        rows.append((cls, cx, cy, w, h))
    return rows


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


# --------------------------------------------------------------------------- shared: run folder


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


def git_commit() -> str:
    """HEAD's sha, with ``+dirty`` when the working tree has changes; 'unknown' outside git."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True,
                               text=True, timeout=10).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


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


def write_run_files(run_dir: Path, script: str, argv: list[str], args: argparse.Namespace, info: DatasetInfo | None,
                    extra: dict[str, Any], *, splits_sha256: str | None = None, splits_note: str | None = None,
                    contract: Contract | None = None) -> dict[str, Any]:
    """args.json, git_commit, splits_sha256, contract.json and run.json of a new run."""
    params = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    (run_dir / "args.json").write_text(json.dumps({"command": command_line(script, argv), "argv": argv, "args": params},
                                                  indent=2) + "\n")
    commit = git_commit()
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


def read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise TrainError(f"cannot read {path}: {err}") from None


def note_resume(run_dir: Path, script: str, argv: list[str]) -> dict[str, Any]:
    """Record a --resume invocation in run.json; returns the run record."""
    run = read_json(run_dir / "run.json")
    run.setdefault("resumed", []).append({"command": command_line(script, argv), "at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
                                          "git_commit": git_commit()})
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
    return {
        "command": run["command"],
        "resumed_with": [r["command"] for r in run.get("resumed", [])],
        "epochs": len(rows),
        "wall_time_s": round(sum(seconds), 1),
        "seconds_per_epoch": round(sum(seconds) / len(seconds), 2) if seconds else None,
        "git_commit": git_commit(),
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "device": device_description(device),
        "seed": seed,
    }


def base_card(*, name: str, backend: str, architecture: str, imgsz: int, contract: Contract, started_from: str,
              training: dict[str, Any], dataset_yaml: str | None, splits_sha256: str | None, **extra: Any) -> dict[str, Any]:
    """The model card written beside the best weights; evaluate.py --write-card adds thresholds and metrics."""
    return {
        "name": name,
        "backend": backend,
        "architecture": architecture,
        "classes": list(CLASSES),
        "imgsz": int(imgsz),
        "contract": contract.to_dict(),
        "started_from": started_from,
        "training": training,
        "dataset": {"yaml": dataset_yaml, "splits_sha256": splits_sha256},
        **extra,
        "disclaimer": DISCLAIMER,
    }


def write_card(weights: Path, card: dict[str, Any]) -> Path:
    """Write `card` where inference.load_model_card looks for it, keeping any metrics already there."""
    path = card_path_for(weights)
    if path.is_file():
        try:
            old = json.loads(path.read_text())
        except json.JSONDecodeError:
            old = {}
        for key in ("thresholds", "metrics", "evaluation", "validation", "test"):
            if key in old and key not in card:
                card[key] = old[key]
    path.write_text(json.dumps(card, indent=2) + "\n")
    return path


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


def restore_run_args(args: argparse.Namespace, saved: dict[str, Any], argv: list[str], changeable: set[str]) -> None:
    """On --resume: the run's saved settings, except `changeable` ones given again on this command line.

    Per-invocation options (resume, project, name, stop_after) always keep this invocation's values.
    """
    given = {a[2:].split("=", 1)[0].replace("-", "_") for a in argv if a.startswith("--")}
    for key, value in saved.items():
        if key in {"resume", "project", "name", "stop_after"} or (key in changeable and key in given):
            continue
        setattr(args, key, Path(value) if isinstance(getattr(args, key, None), Path) and value else value)


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


# --------------------------------------------------------------------------- YOLO specifics


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


def scratch_yaml_for(name: str) -> str:
    """yolov8n.pt -> yolov8n.yaml (the same architecture, untrained)."""
    return re.sub(r"\.pt$", ".yaml", Path(name).name)


def resolve_start(model: str, allow_scratch: bool, fetch_dir: Path) -> tuple[str, str]:
    """(what to give YOLO(), the card's `started_from`) for a --model value."""
    path = Path(model)
    if path.suffix.lower() in ARCH_SUFFIXES:
        if path.parent != Path(".") and not path.is_file():
            raise TrainError(f"architecture file not found: {path}")
        return (str(path.resolve()) if path.is_file() else model), f"scratch: {path.name} (architecture only, no pretrained weights)"
    if path.suffix.lower() != ".pt":
        raise TrainError(f"--model must be a .pt checkpoint or an architecture .yaml, got {model!r}")
    if path.is_file():
        return str(path.resolve()), f"weights: {display_path(path)}"
    if path.parent != Path("."):
        raise TrainError(f"weights not found: {path}")
    from ultralytics.utils import SETTINGS
    from ultralytics.utils.downloads import GITHUB_ASSETS_NAMES

    if path.name not in GITHUB_ASSETS_NAMES:
        raise TrainError(f"weights not found: {path} (and it is not an Ultralytics release name such as yolov8n.pt)")
    cached = [fetch_dir / path.name, Path(SETTINGS["weights_dir"]) / path.name]
    for candidate in cached:
        if candidate.is_file():
            return str(candidate), f"COCO-pretrained {path.name} (Ultralytics release, cached at {display_path(candidate)})"
    reason = "no network (github.com unreachable)"
    if online():
        from ultralytics.utils.downloads import attempt_download_asset

        fetch_dir.mkdir(parents=True, exist_ok=True)
        try:
            got = Path(attempt_download_asset(str(fetch_dir / path.name)))
            if got.is_file():
                return str(got), f"COCO-pretrained {path.name} (Ultralytics release, fetched)"
        except Exception as err:  # noqa: BLE001 - any download failure means the same thing here
            reason = f"download failed: {str(err).strip().splitlines()[0][:160]}"
    arch = scratch_yaml_for(path.name)
    if not allow_scratch:
        raise TrainError(f"{path.name} could not be fetched ({reason}); pass --allow-scratch to train {arch} from scratch "
                         "(no pretrained weights), or --model PATH to a local .pt")
    print(f"note: {path.name} could not be fetched ({reason}); training {arch} from scratch (--allow-scratch)")
    return arch, f"scratch: {arch} ({path.name} COCO weights could not be fetched offline)"


def build_ultralytics_view(info: DatasetInfo, view_dir: Path, *, fraction: float, val_fraction: float,
                           max_images: int | None, seed: int) -> Path:
    """A mirror of the tree (symlinked files, real folders) plus a yaml with an absolute `path`.

    Ultralytics writes label caches beside the labels and resolves relative
    yaml paths its own way; the mirror keeps both away from the dataset (which
    is never written to) and makes --fraction a fixed, seeded subset that a
    --resume sees again.
    """
    yaml_path = view_dir / "dataset.yaml"
    if yaml_path.is_file():
        return yaml_path
    import yaml

    entries = {}
    counts = {}
    for split in ("train", "val", "test"):
        images = info.images(split)
        if not images:
            if split in ("train", "val"):
                raise TrainError(f"the {split} split of {info.yaml_path} holds no images")
            continue
        if split == "train":
            images = subset(images, fraction, seed, max_images)
        elif split == "val":
            images = subset(images, val_fraction, seed, max_images)
        for image in images:
            base = next(f for f in info.splits[split] if image.is_relative_to(f))
            rel = image.relative_to(base)
            target = view_dir / "images" / split / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            _link(image, target)
            label = label_path_for(image)
            if label.is_file():
                read_yolo_boxes(label)  # refuse malformed labels before training starts
                label_target = (view_dir / "labels" / split / rel).with_suffix(".txt")
                label_target.parent.mkdir(parents=True, exist_ok=True)
                _link(label, label_target)
        entries[split] = f"images/{split}"
        counts[split] = len(images)
    payload = {"path": str(view_dir.resolve()), **entries, "names": dict(enumerate(info.names))}
    yaml_path.write_text(f"# generated by train.py from {info.yaml_path} (images: {counts})\n" + yaml.safe_dump(payload, sort_keys=False))
    return yaml_path


def _link(source: Path, target: Path) -> None:
    if target.is_symlink() or target.exists():
        target.unlink()
    try:
        target.symlink_to(source.resolve())
    except OSError:  # filesystems without symlinks
        shutil.copy2(source, target)


class StopAfter(Exception):
    """Raised from a callback after --stop-after epochs: last.pt keeps its optimizer, so --resume continues."""


def _yolo_callbacks(model: Any, run_dir: Path, stop_after: int | None) -> dict[str, Any]:
    """Per-epoch train_log rows and the --stop-after switch, as Ultralytics callbacks."""
    state: dict[str, Any] = {"t0": None, "t_train": None, "done": 0}

    def on_train_epoch_start(trainer):
        state["t0"] = time.perf_counter()

    def on_train_epoch_end(trainer):
        state["t_train"] = time.perf_counter()

    def on_fit_epoch_end(trainer):
        if state["t0"] is None:  # the final validation of best.pt also fires this event: not an epoch
            return
        now = time.perf_counter()
        seconds = now - state["t0"]
        train_seconds = (state["t_train"] or now) - state["t0"]  # without validation and saving
        state["t0"] = state["t_train"] = None
        metrics = trainer.metrics or {}
        row = {"epoch": trainer.epoch + 1}
        row.update(_loss_items(trainer))
        row.update(val_mAP50=float(metrics.get("metrics/mAP50(B)", float("nan"))),
                   val_mAP50_95=float(metrics.get("metrics/mAP50-95(B)", float("nan"))),
                   train_seconds=round(train_seconds, 2), seconds=round(seconds, 2))
        log_epoch(run_dir, row)
        state["done"] += 1
        if stop_after and state["done"] >= stop_after and trainer.epoch + 1 < trainer.epochs:
            raise StopAfter(trainer.epoch + 1)

    model.add_callback("on_train_epoch_start", on_train_epoch_start)
    model.add_callback("on_train_epoch_end", on_train_epoch_end)
    model.add_callback("on_fit_epoch_end", on_fit_epoch_end)
    return state


def _loss_items(trainer: Any) -> dict[str, float]:
    """The epoch's mean training losses by name (Ultralytics keeps them as a dict or a tensor, by version)."""
    tloss = trainer.tloss
    if tloss is None:
        return {}
    if isinstance(tloss, dict):
        return {str(k).split("/")[-1]: float(v) for k, v in tloss.items()}
    values = tloss.tolist() if hasattr(tloss, "tolist") else [float(tloss)]
    values = values if isinstance(values, list) else [values]
    return {str(n): float(v) for n, v in zip(trainer.loss_names, values)}


def parse_hyp(pairs: list[str]) -> dict[str, Any]:
    """--hyp key=value pairs (values parsed as YAML scalars) passed on to Ultralytics."""
    import yaml

    out = {}
    for pair in pairs:
        if "=" not in pair:
            raise TrainError(f"--hyp expects key=value, got {pair!r}")
        key, value = pair.split("=", 1)
        out[key.strip()] = yaml.safe_load(value)
    return out


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Research and teaching tool, not a diagnosis.")
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="dataset.yaml of a harmonized tree (default: %(default)s)")
    p.add_argument("--contract", type=Path, default=None, help="the contract the tree was made with (default: its contract.json)")
    p.add_argument("--model", default="yolov8n.pt", help="a .pt (local or Ultralytics name) or an architecture .yaml")
    p.add_argument("--allow-scratch", action="store_true", help="if a named .pt cannot be fetched, train its .yaml from scratch")
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--imgsz", type=int, default=640)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--workers", type=int, default=2, help="data loader workers (the machine has 2 cores)")
    p.add_argument("--device", default="cpu", help="cpu, 0, 0,1,2,3 (Ultralytics DDP)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--patience", type=int, default=50, help="early stopping patience in epochs")
    p.add_argument("--optimizer", default="auto")
    p.add_argument("--lr0", type=float, default=None)
    p.add_argument("--close-mosaic", type=int, default=10)
    p.add_argument("--cache", default="false", choices=["false", "ram", "disk"], help="Ultralytics image cache")
    p.add_argument("--fraction", type=float, default=1.0, help="train on this seeded fraction of the train split")
    p.add_argument("--val-fraction", type=float, default=1.0, help="validate on this seeded fraction of the val split")
    p.add_argument("--max-images", type=int, default=None, help="at most this many train (and val) images")
    p.add_argument("--hyp", action="append", default=[], metavar="KEY=VALUE", help="any other Ultralytics train argument")
    p.add_argument("--project", type=Path, default=DEFAULT_RUNS, help="runs folder (default: %(default)s)")
    p.add_argument("--name", default=None, help="run name (default: <model stem>-<imgsz>)")
    p.add_argument("--exist-ok", action="store_true", help="overwrite a run folder of the same name")
    p.add_argument("--resume", action="store_true", help="continue the interrupted run --name from weights/last.pt")
    p.add_argument("--stop-after", type=int, default=None, metavar="N",
                   help="stop after N epochs of this invocation, resumable with --resume (time-sliced training)")
    p.add_argument("--export", choices=["onnx"], default=None, help="export the best weights after training")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default: Ultralytics' choice)")
    p.add_argument("--static", action="store_true", help="export a fixed imgsz x imgsz ONNX input (default: dynamic H x W)")
    p.add_argument("--evaluate", action="store_true", help="run evaluate.py --write-card on the best weights afterwards")
    p.add_argument("--quiet", action="store_true", help="less Ultralytics output")
    return p


def _check_args(args: argparse.Namespace) -> None:
    if args.epochs < 1 or args.imgsz < 32 or args.batch < 1:
        raise TrainError("--epochs and --batch must be >= 1 and --imgsz >= 32")
    if args.imgsz % 32:
        raise TrainError(f"--imgsz must be a multiple of 32 (the model stride), got {args.imgsz}")
    for name in ("fraction", "val_fraction"):
        if not 0 < getattr(args, name) <= 1:
            raise TrainError(f"--{name.replace('_', '-')} must lie in (0, 1]")
    if args.stop_after is not None and args.stop_after < 1:
        raise TrainError("--stop-after must be >= 1")


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


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("YOLO_OFFLINE", "1")
    return run_cli(_run, get_args_parser(), argv)


def _run(args: argparse.Namespace, argv: list[str]) -> int:
    _check_args(args)
    if args.resume:
        if not args.name:
            raise TrainError("--resume needs --name of the run to continue")
        return _resume(args, argv)
    args.data, args.contract = absolute(args.data), absolute(args.contract)  # a later --resume may run elsewhere
    info = load_dataset(args.data, args.contract)
    source, started_from = resolve_start(args.model, args.allow_scratch, ROOT / "cache" / "weights")
    name = args.name or f"{Path(args.model).stem}-{args.imgsz}"
    run_dir = prepare_run_dir(args.project, name, resume=False, exist_ok=args.exist_ok)
    if args.exist_ok:
        for stale in ("train_log.csv", "dataset"):
            path = run_dir / stale
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
    seed_everything(args.seed)
    view_yaml = build_ultralytics_view(info, run_dir / "dataset", fraction=args.fraction, val_fraction=args.val_fraction,
                                       max_images=args.max_images, seed=args.seed)
    run = write_run_files(run_dir, "train.py", argv, args, info, {
        "backend": "yolo", "model": args.model, "model_source": source, "started_from": started_from,
        "ultralytics_data": str(view_yaml), "epochs_planned": args.epochs, "seed": args.seed, "device": args.device,
    })
    hyp = parse_hyp(args.hyp)
    from ultralytics import YOLO

    model = YOLO(source, task="detect")
    _yolo_callbacks(model, run_dir, args.stop_after)
    train_args = dict(
        data=str(view_yaml), epochs=args.epochs, imgsz=args.imgsz, batch=args.batch, workers=args.workers,
        device=args.device, seed=args.seed, deterministic=True, project=str(run_dir.parent), name=run_dir.name,
        exist_ok=True, plots=False, amp=args.device != "cpu", patience=args.patience, optimizer=args.optimizer,
        close_mosaic=args.close_mosaic, cache=False if args.cache == "false" else args.cache, verbose=not args.quiet,
    )
    if args.lr0 is not None:
        train_args["lr0"] = args.lr0
    train_args.update(hyp)
    print(f"training {Path(source).name} on {display_path(info.yaml_path)} -> {display_path(run_dir)}")
    return _train_and_finish(model, train_args, run_dir, run, args)


def _resume(args: argparse.Namespace, argv: list[str]) -> int:
    run_dir = prepare_run_dir(args.project, args.name, resume=True, exist_ok=False)
    last = run_dir / "weights" / "last.pt"
    if not last.is_file():
        raise TrainError(f"cannot resume {run_dir}: weights/last.pt is missing (no epoch finished yet?)")
    saved = read_json(run_dir / "args.json")["args"]
    planned = int(saved["epochs"])
    done = len(read_train_log(run_dir))
    if done >= planned or (run_dir / "weights" / "best.json").is_file():
        raise TrainError(f"{run_dir.name} already finished its {planned} epochs; to train further start a new run "
                         f"with --model {display_path(last)}")
    run = note_resume(run_dir, "train.py", argv)
    given = _explicit(argv)
    for key in ("export", "opset", "static", "evaluate"):  # what to do after training: as first asked, unless given now
        if key not in given and key in saved:
            setattr(args, key, saved[key])
    seed_everything(int(saved["seed"]))
    from ultralytics import YOLO

    model = YOLO(str(last), task="detect")
    _yolo_callbacks(model, run_dir, args.stop_after)
    print(f"resuming {run_dir.name} after epoch {done} of {planned}")
    train_args = dict(resume=str(last), workers=args.workers, plots=False, device=saved["device"])
    return _train_and_finish(model, train_args, run_dir, run, args)


def _explicit(argv: list[str]) -> set[str]:
    """Option names given on the command line (as argparse dests)."""
    return {a[2:].split("=", 1)[0].replace("-", "_") for a in argv if a.startswith("--")}


def _train_and_finish(model: Any, train_args: dict[str, Any], run_dir: Path, run: dict[str, Any], args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    try:
        model.train(**train_args)
    except StopAfter as stop:
        print(f"stopped after epoch {stop.args[0]} as asked (--stop-after); continue with: "
              f"python train.py --name {run_dir.name} --resume")
        return 0
    wall = time.perf_counter() - t0
    best = run_dir / "weights" / "best.pt"
    if not best.is_file():
        raise TrainError(f"training ended without {best}")
    saved = read_json(run_dir / "args.json")["args"]
    seed, device, imgsz = int(saved["seed"]), str(saved["device"]), int(saved["imgsz"])
    info_contract = Contract.load(run_dir / "contract.json")
    arch = _architecture_name(model, run.get("model", ""))
    training = training_summary(run_dir, run, seed, device)
    best_row = max(read_train_log(run_dir), key=lambda r: _num(r.get("val_mAP50")), default={})
    card = base_card(
        name=run_dir.name, backend="yolo", architecture=arch, imgsz=imgsz, contract=info_contract,
        started_from=run["started_from"], training=training,
        dataset_yaml=display_path(saved["data"]), splits_sha256=(run.get("dataset") or {}).get("splits_sha256"),
        training_validation={"best_epoch": int(best_row["epoch"]) if best_row else None,
                             "val_mAP50": _num(best_row.get("val_mAP50")) if best_row else None,
                             "val_mAP50_95": _num(best_row.get("val_mAP50_95")) if best_row else None,
                             "note": "Ultralytics' own validation during training; evaluate.py gives the reported metrics"},
    )
    card_path = write_card(best, card)
    rows = read_train_log(run_dir)
    print(f"done: {len(rows)} epoch(s), {training['seconds_per_epoch']} s/epoch, this invocation {wall:.0f} s; "
          f"best weights {display_path(best)}, card {display_path(card_path)}")
    rc = 0
    if args.export == "onnx":
        from scripts.export_onnx import export_onnx

        onnx_path = export_onnx(best, imgsz=imgsz, opset=args.opset, dynamic=not args.static)
        print(f"exported {display_path(onnx_path)} (card {display_path(card_path_for(onnx_path))})")
    if args.evaluate:
        rc = evaluate_after_training(best, Path(saved["data"]), default_torch_threads())
    else:
        print("next: python evaluate.py --weights " + display_path(best) + " --data " + display_path(saved["data"]) + " --write-card")
    print(DISCLAIMER)
    return 1 if rc else 0


def _num(value: Any) -> float:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return float("-inf")
    return out if out == out else float("-inf")


def _architecture_name(model: Any, requested: str) -> str:
    """yolov8n / yolo11s ... from the model's yaml, else the --model stem."""
    try:
        yaml_file = model.model.yaml.get("yaml_file", "")
        if yaml_file:
            return Path(yaml_file).stem
    except AttributeError:
        pass
    return Path(requested).stem


if __name__ == "__main__":
    sys.exit(main())

"""Build the default merged dataset: ingest -> harmonize -> split, for every set in DATA that has boxes.

    python scripts/build_dataset.py --data ../shared/data --out data/merged      # what `make dataset` runs

For each folder of DATA with an entry in configs/sources.yaml, the entry's ingest
script writes WORK/ingest/<folder>/ (links to the originals, labels, manifest.csv),
scripts/preprocess.py harmonizes it into WORK/harmonized/<folder>/ (re-runs skip
images that are up to date), and scripts/make_splits.py merges every harmonized
source into OUT (images/, labels/, splits.csv, dataset.yaml, contract.json,
build_info.json), which is then verified from splits.csv alone. Each step's
command is printed, so any of them can be re-run by hand.

A folder of DATA that holds labels but has no entry stops the build (add it to
the config); one without labels and without an entry is reported as skipped.
Nothing is written under DATA.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from bone_r.dataset import is_inside

ROOT = Path(__file__).resolve().parents[1]

SCRIPTS = {"fracatlas": "fracatlas_to_yolo.py", "yolo": "ingest_yolo.py", "mura": "mura_to_yolo.py"}
ENTRY_KEYS = {"ingest", "classes", "region", "region_by_class", "group", "empty", "args", "skip"}


class BuildError(Exception):
    pass


def load_config(path: Path) -> dict[str, dict]:
    import yaml

    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise BuildError(f"cannot read the sources config {path}: {err}") from None
    sources = (data or {}).get("sources")
    if not isinstance(sources, dict):
        raise BuildError(f"{path} needs a 'sources:' mapping of folder name -> settings")
    for name, entry in sources.items():
        if not isinstance(entry, dict):
            raise BuildError(f"{path}: the entry '{name}' must be a mapping")
        unknown = set(entry) - ENTRY_KEYS
        if unknown:
            raise BuildError(f"{path}: '{name}' has unknown key(s) {sorted(unknown)}; known: {sorted(ENTRY_KEYS)}")
        if "skip" not in entry and entry.get("ingest") not in SCRIPTS:
            raise BuildError(f"{path}: '{name}' needs ingest: one of {sorted(SCRIPTS)} (or skip: \"reason\")")
    return sources


def ingest_args(name: str, entry: dict) -> list[str]:
    """The ingest script's options for a config entry."""
    kind = entry["ingest"]
    args: list[str] = ["--source", name]
    if kind == "yolo":
        classes = entry.get("classes")
        if classes in (None, "all"):
            if classes is None:
                raise BuildError(f"sources config: '{name}' needs classes: all, a list of names or a list of indices")
            args.append("--all-classes")
        elif isinstance(classes, list) and classes and all(isinstance(c, int) for c in classes):
            args += ["--classes", ",".join(str(c) for c in classes)]
        elif isinstance(classes, list) and classes:
            args += ["--class-names", ",".join(str(c) for c in classes)]
        else:
            raise BuildError(f"sources config: '{name}': classes must be 'all' or a non-empty list")
        if "region" in entry:
            args += ["--region", str(entry["region"])]
        if "region_by_class" in entry:
            args += ["--region-by-class", ",".join(f"{k}={v}" for k, v in entry["region_by_class"].items())]
        args += ["--group", str(entry.get("group", "auto")), "--empty", str(entry.get("empty", "negative"))]
    elif kind == "mura":
        args += ["--mode", "weakbox"]
    else:
        extra = set(entry) - {"ingest", "args"}
        if extra:
            raise BuildError(f"sources config: '{name}' (ingest: {kind}) does not take {sorted(extra)}")
    return args + [str(a) for a in entry.get("args", [])]


def has_labels(folder: Path) -> str | None:
    """What in `folder` looks like labels (for an unconfigured folder), or None."""
    for dirpath, dirnames, filenames in os.walk(folder):
        here = Path(dirpath)
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for f in filenames:
            low = f.lower()
            if low in ("data.yaml", "meta.yaml"):
                return f"{(here / f).relative_to(folder)} (a YOLO export's class list)"
            if low.endswith(".txt") and here.name.lower() == "labels":
                return f"{here.relative_to(folder)}/*.txt (YOLO label files)"
            if low.endswith(".json") and ("coco" in low or "annotation" in str(here).lower()):
                return f"{(here / f).relative_to(folder)} (COCO annotations)"
            if low.endswith(".xml") and "annotation" in str(here).lower():
                return f"{(here / f).relative_to(folder)} (VOC annotations)"
    return None


def run(cmd: list[str], log: list[dict], step: str) -> str:
    """Run one step, echoing its command and output; stderr (progress bars) goes straight through."""
    print(f"\n$ {shlex.join(cmd)}", flush=True)
    started = time.time()
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, cwd=ROOT)
    print(proc.stdout, end="", flush=True)
    seconds = round(time.time() - started, 1)
    log.append({"step": step, "command": shlex.join(cmd), "seconds": seconds, "output": proc.stdout.strip().splitlines()})
    if proc.returncode != 0:
        raise BuildError(f"step '{step}' failed (exit {proc.returncode}): {shlex.join(cmd)}")
    return proc.stdout


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 2)[2])
    p.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data", help="folder of source sets (read only; default ../shared/data)")
    p.add_argument("--out", type=Path, default=ROOT / "data" / "merged", help="output dataset folder (default data/merged)")
    p.add_argument("--work", type=Path, default=ROOT / "data" / "work", help="intermediate folder (default data/work)")
    p.add_argument("--config", type=Path, default=ROOT / "configs" / "sources.yaml", help="per-source ingest settings")
    p.add_argument("--contract", type=Path, help="harmonization contract for preprocess.py (default: its defaults)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ratios", default="0.70,0.15,0.15", help="train,val,test (default 0.70,0.15,0.15)")
    p.add_argument("--copy", action="store_true", help="copy images into OUT instead of hard-linking them")
    p.add_argument("--workers", type=int, help="preprocess.py worker processes (default: its own)")
    p.add_argument("--keep-going", action="store_true", help="leave out (and count) images that cannot be decoded instead of stopping")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT (e.g. an earlier build)")
    p.add_argument("--dry-run", action="store_true", help="only say which folders would be built or skipped")
    return p


def plan(data: Path, config: dict[str, dict]) -> tuple[list[tuple[str, dict]], dict[str, str]]:
    """(sources to build, {folder: why skipped}); BuildError for labelled folders without an entry."""
    build, skipped, missing = [], {}, []
    for folder in sorted(p for p in data.iterdir() if p.is_dir() and not p.name.startswith(".")):
        entry = config.get(folder.name)
        if entry is None:
            found = has_labels(folder)
            if found:
                missing.append(f"{folder.name} (has {found})")
            else:
                skipped[folder.name] = "no box labels (and no entry in the sources config)"
        elif "skip" in entry:
            skipped[folder.name] = str(entry["skip"])
        else:
            build.append((folder.name, entry))
    if missing:
        raise BuildError(
            "these folders of DATA hold labels but have no entry in the sources config; add each to configs/sources.yaml "
            "(ingest script, classes, region, group rule, empty-label rule) or give it skip: \"reason\": " + "; ".join(missing)
        )
    return build, skipped


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    started = time.time()
    log: list[dict] = []
    try:
        data, out, work = args.data, args.out, args.work
        if not data.is_dir():
            raise BuildError(f"the data folder {data} does not exist")
        for what, path in (("--out", out), ("--work", work)):
            if is_inside(path, data) or is_inside(data, path):
                raise BuildError(f"{what} {path} overlaps the data folder {data}: nothing may be written there")
        if out.is_dir() and any(out.iterdir()) and not args.overwrite:
            raise BuildError(f"{out} is not empty (an earlier build?): pass --overwrite (make dataset OVERWRITE=1) or choose another OUT")
        config = load_config(args.config)
        build, skipped = plan(data, config)
        not_present = sorted(set(config) - {p.name for p in data.iterdir() if p.is_dir()})
        print(f"build_dataset: DATA={data} OUT={out} WORK={work}")
        for name, entry in build:
            print(f"  build   {name:<24} ({SCRIPTS[entry['ingest']]})")
        for name, reason in skipped.items():
            print(f"  skipped {name:<24} {reason}")
        if not_present:
            print(f"  configured but not in DATA: {', '.join(not_present)}")
        if not build:
            raise BuildError(f"no folder of {data} has a build entry in {args.config}")
        if args.dry_run:
            return 0
        python = sys.executable
        harmonized = []
        for name, entry in build:
            ingest_dir, harm_dir = work / "ingest" / name, work / "harmonized" / name
            run([python, str(ROOT / "scripts" / SCRIPTS[entry["ingest"]]), str(data / name), str(ingest_dir), *ingest_args(name, entry), "--overwrite"], log, f"ingest {name}")
            cmd = [python, str(ROOT / "scripts" / "preprocess.py"), str(ingest_dir), str(harm_dir)]
            if args.contract:
                cmd += ["--contract", str(args.contract)]
            if args.workers:
                cmd += ["--workers", str(args.workers)]
            if args.keep_going:
                cmd.append("--keep-going")
            run(cmd, log, f"harmonize {name}")
            harmonized.append(str(harm_dir))
        cmd = [python, str(ROOT / "scripts" / "make_splits.py"), *harmonized, "--out", str(out), "--seed", str(args.seed), "--ratios", args.ratios]
        cmd += ["--copy"] if args.copy else []
        cmd += ["--overwrite"] if args.overwrite else []
        cmd += ["--allow-missing"] if args.keep_going else []
        run(cmd, log, "split")
        run([python, str(ROOT / "scripts" / "make_splits.py"), "--verify", str(out)], log, "verify")
    except BuildError as err:
        print(f"build_dataset: error: {err}", file=sys.stderr)
        return 2
    info_path = out / "build_info.json"
    info = json.loads(info_path.read_text())
    info["build"] = {
        "command": shlex.join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "data": str(data.resolve()),
        "config": str(args.config),
        "built": [name for name, _ in build],
        "skipped": skipped,
        "steps": log,
        "seconds": round(time.time() - started, 1),
    }
    info_path.write_text(json.dumps(info, indent=2) + "\n")
    print(f"\nbuild_dataset: done in {info['build']['seconds']:.0f} s: {out}/dataset.yaml and {out}/splits.csv "
          f"({info['images']} images, {info['groups']} groups; sources {', '.join(info['build']['built'])})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

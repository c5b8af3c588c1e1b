"""Write the human model card (MODEL_CARD.md) from a model card JSON.

    python scripts/write_model_card.py --card weights/bone-r-default.json --out MODEL_CARD.md

Every number in the Markdown comes from the JSON (which train.py / train_torchvision.py
and `evaluate.py --write-card` wrote); nothing is typed by hand, so the two cannot
disagree. Optional `--extra` JSON adds the speed table and the candidates compared.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from bone_r import DISCLAIMER
from bone_r.modes import MODES
from bone_r.report import map50_text, num, with_ci

ROOT = Path(__file__).resolve().parents[1]


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--card", type=Path, required=True, help="model card JSON (weights/<name>.json)")
    p.add_argument("--out", type=Path, default=ROOT / "MODEL_CARD.md")
    p.add_argument("--extra", type=Path, default=None,
                   help="JSON with optional 'speed' (rows of stage timings) and 'candidates' (rows of compared models)")
    p.add_argument("--candidates", type=Path, nargs="*", default=[], metavar="RUN_DIR",
                   help="run folders (runs/<name>) compared when choosing the model: a table from their train_log.csv, "
                        "args.json and run.json")
    p.add_argument("--speed", type=Path, default=None, metavar="SPEED_JSON",
                   help="what `benchmark.py --speed --json SPEED_JSON` wrote: the CPU speed table")
    return p


def speed_rows(payload: dict[str, Any]) -> list[dict[str, Any]]:
    """The speed table from `benchmark.py --speed --json`: median ms per stage, per model."""
    rows = []
    for m in payload["models"]:
        stages = m["stages_ms"]
        rows.append({"model": m["name"], "backend": m["backend"],
                     **{f"{k} ms": stages[k]["median"] for k in ("decode", "harmonize", "model", "post")},
                     "end to end ms (median)": stages["end_to_end"]["median"], "p90": stages["end_to_end"]["p90"],
                     "speed-up": m.get("speedup_vs_plain_pytorch")})
    return rows


def candidate_row(run_dir: Path) -> dict[str, Any]:
    """One compared training run, read from what the trainers wrote into its folder."""
    import csv
    import statistics

    with open(run_dir / "train_log.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    if not rows:
        raise ValueError(f"{run_dir}/train_log.csv has no epochs")
    args = json.loads((run_dir / "args.json").read_text())["args"]
    run = json.loads((run_dir / "run.json").read_text())
    best = max(rows, key=lambda r: float(r.get("val_mAP50") or 0))
    fraction = args.get("fraction") or 1.0
    return {"run": run_dir.name, "backend": run.get("backend"), "imgsz": args.get("imgsz"),
            "pretrained": "scratch" if str(run.get("started_from", "")).startswith("scratch") else "ImageNet backbone",
            "train images": run.get("train_images") or (f"all x {fraction}" if fraction != 1 else "all"),
            "val images": run.get("val_images") or ("all" if (args.get("val_fraction") or 1) == 1 else f"x {args['val_fraction']}"),
            "epochs": len(rows), "best epoch": int(best["epoch"]),
            "val mAP@0.5": round(float(best["val_mAP50"]), 4), "val mAP@0.5:0.95": round(float(best["val_mAP50_95"]), 4),
            "train s/epoch": round(statistics.median(float(r["train_seconds"]) for r in rows))}


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def breakdown(parts: dict[str, Any], mode: str = "balanced", mean: dict[str, Any] | None = None) -> str:
    rows = []
    for name, entry in sorted(parts.items()):
        level = entry["image_level"].get(mode, {})
        rows.append([name, str(entry["n_images"]), str(entry["n_positive"]), map50_text(entry["box"], dash="–"),
                     num(entry["box"].get("map50_95")), num(entry.get("image_auc")), with_ci(level.get("sensitivity"), dash="–", note=False),
                     with_ci(level.get("specificity"), dash="–", note=False)])
    if mean:
        rows.append(["**mean over sources**", "", "", num(mean["map50"]["value"]), "", num(mean["image_auc"]["value"]),
                     num(mean["sensitivity"]["value"]), num(mean["specificity"]["value"])])
    with_intervals = any((entry["box"].get("map50_interval") or {}).get("ci") for entry in parts.values())
    return table(["", "images", "positive", "mAP@0.5 [95% CI]" if with_intervals else "mAP@0.5", "mAP@0.5:0.95", "ROC AUC", "sensitivity [95% CI]", "specificity [95% CI]"], rows)


def size_section(sizes: dict[str, Any] | None) -> list[str]:
    """Sensitivity by fracture size: each source's positives cut in parts by their largest true box."""
    if not sizes or not sizes.get("by_source"):
        return []
    rows = [[source, f"{k + 1}", f"{100 * r['area_min']:.2f}–{100 * r['area_max']:.2f}%", str(r["n"]),
             with_ci(r["flagged"], dash="–"), with_ci(r["found"], dash="–")]
            for source, parts in sorted(sizes["by_source"].items()) for k, r in enumerate(parts)]
    return ["### Sensitivity by fracture size (balanced mode)", "",
            f"Each source's positives (each radiograph once) sorted by the {sizes['area']} and cut in near-equal parts; "
            f"flagged: a box at or above the threshold anywhere; found: one at IoU >= {sizes['iou']} with a true box. "
            "Intervals: Wilson.", "",
            table(["source", "part", "box area", "n", "flagged [95% CI]", "found [95% CI]"], rows), ""]


def render(card: dict[str, Any], extra: dict[str, Any] | None = None) -> str:
    extra = extra or {}
    metrics = card.get("metrics") or {}
    training = card.get("training") or {}
    thresholds = card.get("thresholds") or {}
    out = [f"# Model card: {card.get('name', 'model')}", "", f"**{DISCLAIMER}**", "",
           "Generated by `scripts/write_model_card.py` from the JSON card beside the weights; every number below "
           "was measured by the commands it names.", "", "## What it is", ""]
    out += [f"- Detector: `{card.get('architecture')}` (backend `{card.get('backend')}`), classes {card.get('classes')}, "
            f"input long side {card.get('imgsz')} px.",
            f"- Started from: {card.get('started_from')}.",
            f"- Harmonization contract (applied to every image at prediction time, as in training): `{json.dumps(card.get('contract'))}`"
            f"; reduced-resolution decoding (`reduced_decode`): "
            f"{(card.get('contract') or {}).get('reduced_decode') or 'off'} (JOURNAL 2026-11-29).",
            f"- Trained with: `{training.get('command')}`",
            f"  ({training.get('epochs')} epochs, {num(training.get('wall_time_s'), 0)} s wall time, "
            f"{num(training.get('seconds_per_epoch'), 0)} s/epoch on {training.get('device')}, seed {training.get('seed')}, "
            f"commit {str(training.get('git_commit'))[:10]}).",
            f"- Data: `{(card.get('dataset') or {}).get('yaml')}`, splits.csv sha256 `{(card.get('dataset') or {}).get('splits_sha256')}`."]
    if card.get("export"):
        out.append(f"- Exported: `{json.dumps(card['export'])}`.")
    out += ["", "## Operating points (chosen on the validation split, image level)", ""]
    rows = []
    for mode in MODES:
        t = thresholds.get(mode) or {}
        rows.append([mode, num(t.get("threshold"), 4), num(t.get("target")), num(t.get("val_sensitivity")), num(t.get("val_specificity"))])
    out += [table(["mode", "threshold", "target", "val sensitivity", "val specificity"], rows), ""]
    if metrics:
        box = metrics.get("box") or {}
        out += [f"## Test results ({metrics.get('split')} split: {metrics.get('n_images')} images, "
                f"{metrics.get('n_positive')} with a fracture, {box.get('n_gt_boxes')} boxes)", ""]
        if metrics.get("by_source_radiographs"):
            out += ["### By source, each radiograph once (balanced mode)", "",
                    "Each source on its own, with its own ROC AUC, counting every radiograph once (the first of its "
                    "augmented copies or near-duplicates by file name; Roboflow exports hold up to 3 copies of one "
                    "radiograph). A source with only positives has no specificity or AUC. Intervals: group bootstrap, "
                    "Wilson's below 30 cases, none below 5.", "",
                    breakdown(metrics["by_source_radiographs"], mean=metrics.get("mean_over_sources")), "",
                    f"### Pooled over every source and copy ({metrics.get('n_images')} images)", ""]
        out += [f"Box mAP@0.5 **{map50_text(box, dash='–')}**, mAP@0.5:0.95 **{num(box.get('map50_95'))}** (pycocotools, negatives included). "
                f"Intervals: 95% bootstrap over {metrics.get('bootstrap', {}).get('resampled', 'groups')} "
                f"({metrics.get('bootstrap', {}).get('n_boot')} resamples).", ""]
        rows = []
        for mode in MODES:
            lvl = (metrics.get("image_level") or {}).get(mode) or {}
            rows.append([mode, num(lvl.get("threshold"), 4), with_ci(lvl.get("sensitivity"), dash="–", note=False), with_ci(lvl.get("specificity"), dash="–", note=False),
                         with_ci(lvl.get("ppv"), dash="–", note=False), with_ci(lvl.get("npv"), dash="–", note=False), f"{lvl.get('tp')}/{lvl.get('fp')}/{lvl.get('tn')}/{lvl.get('fn')}"])
        out += [table(["mode", "threshold", "sensitivity", "specificity", "PPV", "NPV", "TP/FP/TN/FN"], rows), ""]
        loc = metrics.get("localization") or {}
        if loc.get("balanced"):
            b = loc["balanced"]
            out += [f"Localization-aware (a positive counts as found only if a box has IoU ≥ {loc.get('iou')} with a true box), "
                    f"balanced mode: {b.get('found')} of {b.get('n_positive')} found, sensitivity {with_ci(b.get('sensitivity'), dash='–', note=False)}; "
                    f"{b.get('mislocalized')} flagged with the box elsewhere.", ""]
        per = metrics.get("boxes_per_flagged_image") or {}
        if per.get("balanced"):
            b = per["balanced"]
            rule = card.get("box_rule")
            out += [f"Boxes a reader sees per flagged image (balanced mode): median {num(b.get('median'), 1)}, 90th percentile "
                    f"{num(b.get('p90'), 1)}, max {b.get('max')}; box rule "
                    f"{json.dumps(rule) + ' (chosen on ' + str(card.get('box_rule_chosen_on')) + ')' if rule else 'none'}; "
                    f"test-time augmentation: " + ("hflip (the radiograph and its mirror image, boxes fused: twice the "
                                                    "model time)" if card.get("tta") == "hflip" else "none") + ".", ""]
        out += ["### By source, every image (balanced mode)", "", breakdown(metrics.get("by_source") or {}), "",
                "### By region, every image (balanced mode)", "", breakdown(metrics.get("by_region") or {}), ""]
        out += size_section(metrics.get("by_fracture_size"))
    if extra.get("candidates"):
        out += ["## Candidates compared (validation split)", "", table(list(extra["candidates"][0].keys()),
                [[num(v) for v in row.values()] for row in extra["candidates"]]),
                "", "Validation mAP from each trainer's own per-epoch validation (`train_log.csv`); runs with fewer val "
                "images used a seeded subset. Seconds are wall time of the training passes on the machine named above, "
                "which may have been shared: compare them loosely.", ""]
    if extra.get("speed"):
        out += ["## CPU speed", "", table(list(extra["speed"][0].keys()), [[num(v, 1) for v in row.values()] for row in extra["speed"]]), ""]
        if extra.get("speed_command"):
            out += [f"Measured: {extra['speed_command']}", ""]
    regions = sorted((metrics.get("by_region") or {}).keys())
    sources = sorted((metrics.get("by_source") or {}).keys())
    out += ["## What it cannot do", "",
            f"- It was trained and tested on these sources only: {', '.join(sources) or 'n/a'}; and these regions: "
            f"{', '.join(regions) or 'n/a'}. Other body parts were never in training; expect it to fail there.",
            "- The test split is in-distribution (the same sources, split by group), so these numbers overstate performance on "
            "a new hospital's images: validate externally (`scripts/external_val.py`) before trusting it anywhere.",
            "- FracAtlas has no patient ids: its images are grouped only by (near-)identical content, so views of one patient "
            "may sit in different splits, which flatters the test numbers.",
            "- Small datasets: per-region rows with few positives (see the counts) have wide intervals and mean little.",
            "- It detects a box-shaped 'fracture' region. The type and severity hints are rules on the box's shape, size and score, "
            "shown as best guesses: never a classification.",
            "- Trained on CPU on a small budget; see JOURNAL.md for the learning curves that show where more training or data would go.",
            "", DISCLAIMER, ""]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    try:
        card = json.loads(args.card.read_text())
        extra = json.loads(args.extra.read_text()) if args.extra else {}
    except (OSError, json.JSONDecodeError) as err:
        print(f"error: cannot read the card: {err}", file=sys.stderr)
        return 2
    what = "a --candidates run folder"
    try:
        if args.candidates:
            extra["candidates"] = [candidate_row(run_dir) for run_dir in args.candidates]
        if args.speed:
            what = f"--speed {args.speed} (benchmark.py --speed --json output)"
            payload = json.loads(args.speed.read_text())
            extra["speed"] = speed_rows(payload)
            machine, images = payload.get("machine", {}), payload.get("images", {})
            extra["speed_command"] = (f"benchmark.py --speed on {images.get('n')} image(s) of {images.get('sizes_wh')} px, "
                                      f"{machine.get('threads')} thread(s), {machine.get('cpu_count')} CPUs, commit "
                                      f"{payload.get('commit')}; speed-up against {(payload.get('baseline') or {}).get('what')}")
    except (OSError, KeyError, ValueError, json.JSONDecodeError) as err:
        print(f"error: cannot read {what}: {type(err).__name__}: {err}", file=sys.stderr)
        return 2
    if not isinstance(card, dict) or "architecture" not in card:
        print(f"error: {args.card} is not a Bone-R model card (no 'architecture')", file=sys.stderr)
        return 2
    args.out.write_text(render(card, extra))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Model cards: `weights/<name>.json` beside the weights. Read, resolved (explicit arguments, then the card, then the
defaults) and written here only. Research and teaching tool, not a diagnosis.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from bone_r import DISCLAIMER
from bone_r.contract import Contract
from bone_r.dataset import EvaluationError
from bone_r.metrics import jsonable
from bone_r.modes import normalize_operating_points


def card_path_for(weights: str | Path) -> Path:
    """The model card that belongs to a weights file: same folder and stem, `.json`."""
    weights = Path(weights)
    return weights.with_suffix(".json")


def load_model_card(weights: str | Path | None) -> dict[str, Any] | None:
    """The weights' model card as a dict, or None when there is none."""
    if weights is None:
        return None
    path = card_path_for(weights)
    if not path.is_file():
        return None
    try:
        card = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"model card {path} is not valid JSON: {err}") from None
    if not isinstance(card, dict):
        raise ValueError(f"model card {path} must hold a JSON object")
    return card


def card_metrics(report: dict[str, Any]) -> dict[str, Any]:
    """The test report's summary as stored in a model card's `metrics`."""

    def slim(level: dict[str, Any]) -> dict[str, Any]:
        return {k: level[k] for k in ("threshold", "sensitivity", "specificity", "ppv", "npv", "tp", "fp", "tn", "fn") if k in level}

    def part(entry: dict[str, Any]) -> dict[str, Any]:
        return {"n_images": entry["n_images"], "n_positive": entry["n_positive"], "n_gt_boxes": entry.get("n_gt_boxes"),
                "box": {k: entry["box"].get(k) for k in ("map50", "map50_95")}, "image_auc": entry.get("image_auc"),
                "image_level": {m: slim(v) for m, v in entry["image_level"].items()}}

    return {
        "split": report["split"], "data": report["data"], "n_images": report["n_images"], "n_positive": report["n_positive"],
        "splits_sha256": report.get("splits_sha256"), "evaluated": report.get("created"),
        "box": {k: report["box"].get(k) for k in ("map50", "map50_95", "n_gt_boxes")},
        "image_auc": report.get("image_auc"),
        "image_level": {m: slim(v) for m, v in report["image_level"].items()},
        "localization": report.get("localization"),
        "boxes_per_flagged_image": report.get("boxes_per_flagged_image"),
        "by_source_radiographs": {k: part(v) for k, v in report.get("by_source_radiographs", {}).items()},
        "mean_over_sources": report.get("mean_over_sources"),
        "by_source": {k: part(v) for k, v in report.get("by_source", {}).items()},
        "by_region": {k: part(v) for k, v in report.get("by_region", {}).items()},
        "bootstrap": {"n_boot": report["settings"]["n_boot"], "seed": report["settings"]["seed"], "resampled": "groups"},
        "notes": report.get("notes", []),
    }


def update_model_card(card_path: str | Path, val_report: dict[str, Any], test_report: dict[str, Any],
                      box_rule: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write the val-chosen `thresholds` and the test `metrics` into the card, keeping every other key.

    `val_report` is a report (its `operating_points` are used) or the operating points
    themselves. The card is replaced atomically; a missing card is created.
    """
    card_path = Path(card_path)
    card: dict[str, Any] = {}
    if card_path.is_file():
        try:
            card = json.loads(card_path.read_text())
        except json.JSONDecodeError as err:
            raise EvaluationError(f"model card {card_path} is not valid JSON: {err}") from None
        if not isinstance(card, dict):
            raise EvaluationError(f"model card {card_path} does not hold a JSON object")
    ops = val_report.get("operating_points", val_report)
    thresholds = {}
    for mode, op in normalize_operating_points(ops, "val").items():
        entry: dict[str, Any] = {"threshold": op["threshold"]}
        if op.get("target") is not None:
            entry["target"] = op["target"]
        entry["val_sensitivity"] = op.get("val_sensitivity")
        entry["val_specificity"] = op.get("val_specificity")
        if "target_reached" in op:
            entry["target_reached"] = op["target_reached"]
        entry["chosen_on"] = op.get("chosen_on", op.get("source", "val"))
        thresholds[mode] = entry
    card["thresholds"] = thresholds
    if box_rule is not None and box_rule.get("source") != "model_card":  # chosen now, or explicitly none
        card["box_rule"] = box_rule["rule"]
        card["box_rule_chosen_on"] = box_rule["source"]
    card["metrics"] = card_metrics(test_report)
    if test_report.get("settings", {}).get("val_split"):
        card["metrics"]["val_split"] = test_report["settings"]["val_split"]
    tmp = card_path.with_name(card_path.name + ".tmp")
    card_path.parent.mkdir(parents=True, exist_ok=True)
    tmp.write_text(json.dumps(jsonable(card), indent=2) + "\n")
    os.replace(tmp, card_path)
    return card


CLASSES = ["fracture"]


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
    """Write `card` where load_model_card looks for it, keeping any metrics already there."""
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

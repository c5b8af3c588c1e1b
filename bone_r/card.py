"""Model cards: `weights/<name>.json` beside the weights. Read, resolved (explicit arguments, then the card, then the
defaults) and written here only. Research and teaching tool, not a diagnosis.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bone_r import DISCLAIMER
from bone_r.contract import Contract
from bone_r.dataset import DataError
from bone_r.detection import BoxRule
from bone_r.metrics import jsonable
from bone_r.modes import normalize_operating_points

# The one default input size (long side, pixels) for a model whose card and weights name none: Ultralytics' own.
DEFAULT_IMGSZ = 640
CLASSES = ["fracture"]
# What an evaluation adds to a card; a trainer rewriting its card keeps them (`write_card(keep_results=True)`).
RESULT_KEYS = ("thresholds", "metrics", "evaluation", "validation", "test", "box_rule", "box_rule_chosen_on", "tta")
# Test-time augmentation a card may ask for: "hflip" = the image and its left-right mirror, boxes fused (`bone_r.fusion`).
TTA_MODES = ("none", "hflip")


def _checked_tta(tta: str | None) -> str | None:
    if tta is not None and tta not in TTA_MODES:
        raise ValueError(f"tta must be one of {', '.join(TTA_MODES)}, got {tta!r}")
    return tta


def card_path_for(weights: str | Path) -> Path:
    """The model card that belongs to a weights file: same folder and stem, `.json`."""
    weights = Path(weights)
    return weights.with_suffix(".json")


@dataclass
class ModelCard:
    """A model card (`weights/<name>.json`), typed: what prediction needs is checked when the card is read
    (`contract`, `box_rule`, `imgsz`, `thresholds`); everything else a card holds (training, dataset, metrics, export,
    notes) stays in `extra`, in its order, and is written back unchanged."""

    name: str | None = None
    backend: str | None = None
    architecture: str | None = None
    classes: list[str] = field(default_factory=lambda: list(CLASSES))
    imgsz: int | None = None
    contract: Contract | None = None
    box_rule: BoxRule | None = None
    tta: str | None = None  # one of TTA_MODES; None: the card does not say (no augmentation)
    thresholds: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] | None = None  # the test metrics `update_model_card` stores
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "model card") -> ModelCard:
        if not isinstance(data, dict):
            raise ValueError(f"{where} must hold a JSON object")
        data = dict(data)
        try:
            classes = data.pop("classes", None) or data.pop("names", None) or list(CLASSES)
            if isinstance(classes, dict):  # Ultralytics' {index: name}
                classes = [classes[k] for k in sorted(classes)]
            imgsz = data.pop("imgsz", None)
            contract = data.pop("contract", None)
            box_rule = data.pop("box_rule", None)
            tta = _checked_tta(data.pop("tta", None))
            thresholds = data.pop("thresholds", None) or {}
            metrics = data.pop("metrics", None)
            if not isinstance(thresholds, dict):
                raise ValueError("thresholds must be a mapping of mode to threshold")
            return cls(name=None if data.get("name") is None else str(data.pop("name")), backend=data.pop("backend", None),
                       architecture=data.pop("architecture", None), classes=[str(c) for c in classes],
                       imgsz=None if imgsz is None else int(imgsz), contract=Contract.from_dict(contract) if contract else None,
                       box_rule=None if box_rule is None else BoxRule.from_dict(box_rule), tta=tta, thresholds=thresholds,
                       metrics=metrics, extra=data)
        except (TypeError, ValueError) as err:
            raise ValueError(f"{where}: {err}") from None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "backend": self.backend, "architecture": self.architecture,
                               "classes": list(self.classes), "imgsz": self.imgsz,
                               "contract": None if self.contract is None else self.contract.to_dict()}
        out = {k: v for k, v in out.items() if v is not None}
        disclaimer = self.extra.get("disclaimer")
        out.update((k, v) for k, v in self.extra.items() if k != "disclaimer")
        if self.thresholds:
            out["thresholds"] = self.thresholds
        if self.box_rule is not None:
            out["box_rule"] = self.box_rule.to_dict()
        if self.tta is not None:
            out["tta"] = self.tta
        if self.metrics is not None:
            out["metrics"] = self.metrics
        if disclaimer is not None:
            out["disclaimer"] = disclaimer
        return out

    @classmethod
    def load(cls, path: str | Path) -> ModelCard:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"model card {path} is not valid JSON: {err}") from None
        return cls.from_dict(data, f"model card {path}")


def load_model_card(weights: str | Path | None) -> ModelCard | None:
    """The weights' model card (`card_path_for`), or None when there is none."""
    if weights is None:
        return None
    path = card_path_for(weights)
    return ModelCard.load(path) if path.is_file() else None


@dataclass(frozen=True)
class Resolved:
    """What a model runs with, each setting from the first that states it: explicit arguments, the model card, the
    defaults. `imgsz` None: the size the weights file itself declares (a checkpoint's config, an export's metadata),
    which only the backend can read; a backend whose weights declare none uses `DEFAULT_IMGSZ`. `sources` says where
    each setting came from."""

    imgsz: int | None
    contract: Contract
    box_rule: BoxRule
    tta: str  # one of TTA_MODES
    sources: dict[str, str]


def resolve(card: ModelCard | None, *, imgsz: int | None = None, contract: Contract | None = None,
            box_rule: BoxRule | None = None, tta: str | None = None) -> Resolved:
    """The one resolver of a model's settings (like timm's ``resolve_data_config``): explicit arguments, then the
    card, then the defaults (`Contract()`, no box rule, no test-time augmentation; for `imgsz`, the weights' own size,
    then `DEFAULT_IMGSZ`)."""
    sources: dict[str, str] = {}

    def first(name: str, *options: tuple[str, Any]) -> Any:
        for source, value in options:
            if value is not None or source == "weights":
                sources[name] = source
                return value
        raise AssertionError(name)

    card = card or ModelCard()
    tta = _checked_tta(tta)
    size = first("imgsz", ("explicit", imgsz), ("model_card", card.imgsz), ("weights", None))
    return Resolved(
        imgsz=None if size is None else int(size),
        contract=first("contract", ("explicit", contract), ("model_card", card.contract), ("default", Contract())),
        box_rule=first("box_rule", ("explicit", box_rule), ("model_card", card.box_rule), ("default", BoxRule())),
        tta=first("tta", ("explicit", tta), ("model_card", card.tta), ("default", "none")),
        sources=sources,
    )


def card_metrics(report: dict[str, Any]) -> dict[str, Any]:
    """The test report's summary as stored in a model card's `metrics`."""

    def slim(level: dict[str, Any]) -> dict[str, Any]:
        return {k: level[k] for k in ("threshold", "sensitivity", "specificity", "ppv", "npv", "tp", "fp", "tn", "fn") if k in level}

    def part(entry: dict[str, Any]) -> dict[str, Any]:
        return {"n_images": entry["n_images"], "n_positive": entry["n_positive"], "n_gt_boxes": entry.get("n_gt_boxes"),
                "box": {k: entry["box"].get(k) for k in ("map50", "map50_95", "map50_interval")}, "image_auc": entry.get("image_auc"),
                "image_level": {m: slim(v) for m, v in entry["image_level"].items()}}

    return {
        "split": report["split"], "data": report["data"], "n_images": report["n_images"], "n_positive": report["n_positive"],
        "splits_sha256": report.get("splits_sha256"), "evaluated": report.get("created"),
        "box": {k: report["box"].get(k) for k in ("map50", "map50_95", "map50_interval", "n_gt_boxes")},
        "image_auc": report.get("image_auc"),
        "image_level": {m: slim(v) for m, v in report["image_level"].items()},
        "localization": report.get("localization"),
        "boxes_per_flagged_image": report.get("boxes_per_flagged_image"),
        "by_source_radiographs": {k: part(v) for k, v in report.get("by_source_radiographs", {}).items()},
        "mean_over_sources": report.get("mean_over_sources"),
        "by_source": {k: part(v) for k, v in report.get("by_source", {}).items()},
        "by_region": {k: part(v) for k, v in report.get("by_region", {}).items()},
        "by_fracture_size": report.get("by_fracture_size"),
        "bootstrap": {"n_boot": report["settings"]["n_boot"], "seed": report["settings"]["seed"], "resampled": "groups"},
        "notes": report.get("notes", []),
    }


def update_model_card(card_path: str | Path, val_report: dict[str, Any], test_report: dict[str, Any],
                      box_rule: dict[str, Any] | None = None, tta: str | None = None,
                      imgsz: int | None = None) -> dict[str, Any]:
    """Write the val-chosen `thresholds` and the test `metrics` into the card, keeping every other key; `tta` and
    `imgsz`, when given, are the test-time augmentation and input size both were measured with (they go into the card
    with them).

    `val_report` is a report (its `operating_points` are used) or the operating points
    themselves. The card is replaced atomically; a missing card is created.
    """
    card_path = Path(card_path)
    try:
        card = ModelCard.load(card_path) if card_path.is_file() else ModelCard()
    except ValueError as err:
        raise DataError(str(err)) from None
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
    card.thresholds = thresholds
    if box_rule is not None and box_rule.get("source") != "model_card":  # chosen now, or explicitly none
        card.box_rule = BoxRule.from_dict(box_rule["rule"])
        card.extra["box_rule_chosen_on"] = box_rule["source"]
    if tta is not None:
        card.tta = tta
    if imgsz is not None:
        card.imgsz = int(imgsz)
    metrics = card_metrics(test_report)
    if test_report.get("settings", {}).get("val_split"):
        metrics["val_split"] = test_report["settings"]["val_split"]
    card.metrics = metrics
    write_card(card_path, card, keep_results=False)
    return card.to_dict()


def base_card(*, name: str, backend: str, architecture: str, imgsz: int, contract: Contract, started_from: str,
              training: dict[str, Any], dataset_yaml: str | None, splits_sha256: str | None, **extra: Any) -> ModelCard:
    """The model card a trainer writes beside the best weights; evaluate.py --write-card adds thresholds and metrics."""
    return ModelCard(name=name, backend=backend, architecture=architecture, classes=list(CLASSES), imgsz=int(imgsz),
                     contract=contract, extra={"started_from": started_from, "training": training,
                                               "dataset": {"yaml": dataset_yaml, "splits_sha256": splits_sha256},
                                               **extra, "disclaimer": DISCLAIMER})


def write_card(weights: str | Path, card: ModelCard | dict[str, Any], *, keep_results: bool = True) -> Path:
    """The one writer of model cards: `card` (typed, or a mapping `ModelCard` accepts) beside `weights`
    (`card_path_for`; a card's own path works too), replaced atomically. With `keep_results`, the evaluation's keys
    (`RESULT_KEYS`) of a card already there are kept when `card` has none (a trainer rewriting its card after
    `evaluate.py --write-card`)."""
    path = card_path_for(weights)
    data = (card if isinstance(card, ModelCard) else ModelCard.from_dict(card)).to_dict()
    if keep_results and path.is_file():
        try:
            old = json.loads(path.read_text())
        except json.JSONDecodeError:
            old = {}
        for key in RESULT_KEYS:
            if isinstance(old, dict) and key in old and key not in data:
                data[key] = old[key]
        data = ModelCard.from_dict(data).to_dict()  # the kept keys in their place
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(jsonable(data), indent=2) + "\n")
    os.replace(tmp, path)
    return path

"""Operating modes: the one registry of modes (how each is chosen on the validation split, and its fallback
threshold) and how a threshold is resolved for a mode. Research and teaching tool, not a diagnosis.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from bone_r.dataset import DataError


@dataclass(frozen=True)
class Mode:
    """An operating mode: how its threshold is chosen on the validation split (`choose_operating_points`) and the
    threshold used when a model has no card (`fallback`: deliberately generic, documented, and reported as
    "fallback" wherever a threshold is shown).

    `target` names the image-level rate the mode guarantees on val: ``sensitivity`` (the most conservative threshold
    reaching the target sensitivity), ``specificity`` (the least conservative reaching the target specificity), or
    None (Youden's J: sensitivity + specificity - 1 at its highest)."""

    name: str
    fallback: float
    target: str | None
    description: str


# The one registry of operating modes: every CLI choice, the service, the model card and the reports read it.
REGISTRY: dict[str, Mode] = {m.name: m for m in (
    Mode("screening", 0.10, "sensitivity", "more sensitive: the target sensitivity on val"),
    Mode("balanced", 0.25, None, "Youden's J on val"),
    Mode("specific", 0.50, "specificity", "fewer false alarms: the target specificity on val"),
)}
MODES = tuple(REGISTRY)
FALLBACK_THRESHOLDS = {name: mode.fallback for name, mode in REGISTRY.items()}


def resolve_threshold(mode: str, card: Any = None, conf: float | None = None) -> tuple[float, str]:
    """(threshold, where it came from) for an operating mode.

    ``conf`` overrides the mode. Otherwise the model card's (`bone_r.card.ModelCard`)
    ``thresholds[mode]`` (chosen on the validation split), else the mode's
    fallback. An unknown mode is an error, never a silent default.
    """
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
    if conf is not None:
        conf = float(conf)
        if not 0.0 <= conf <= 1.0:
            raise ValueError(f"conf must lie in [0, 1], got {conf}")
        return conf, "conf"
    thresholds = getattr(card, "thresholds", None) or {}
    if mode in thresholds:
        entry = thresholds[mode]
        return float(entry["threshold"] if isinstance(entry, dict) else entry), "model_card"
    return REGISTRY[mode].fallback, "fallback"


DEFAULT_TARGET_SENSITIVITY = 0.95


DEFAULT_TARGET_SPECIFICITY = 0.95


def _sens_spec_at(labels: np.ndarray, scores: np.ndarray, taus: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pos = np.sort(scores[labels])
    neg = np.sort(scores[~labels])
    tp = len(pos) - np.searchsorted(pos, taus, side="left")
    fp = len(neg) - np.searchsorted(neg, taus, side="left")
    return tp / len(pos), 1.0 - fp / len(neg)


def choose_operating_points(labels: Sequence[Any], scores: Sequence[float], target_sensitivity: float = DEFAULT_TARGET_SENSITIVITY,
                            target_specificity: float = DEFAULT_TARGET_SPECIFICITY) -> dict[str, dict[str, Any]]:
    """Each mode's threshold (`REGISTRY`: screening / balanced / specific) from image-level labels and scores.

    Candidates are the observed positive scores plus one just above the highest score;
    images without detections (score 0) are never predicted positive.
    Raises ValueError when the labels lack positives or negatives or no image has a detection.
    """
    labels = np.asarray(labels, dtype=bool)
    scores = np.asarray(scores, dtype=np.float64)
    if len(labels) != len(scores):
        raise ValueError(f"{len(labels)} labels for {len(scores)} scores")
    if labels.all() or not labels.any():
        raise ValueError("cannot choose operating points: the validation images must include positives and negatives")
    cands = np.unique(scores[scores > 0])
    if cands.size == 0:
        raise ValueError("cannot choose operating points: no validation image has a detection")
    above = np.nextafter(cands[-1], np.inf)
    if above <= 1.0:
        cands = np.append(cands, above)
    sens, spec = _sens_spec_at(labels, scores, cands)

    def entry(i: int, target: float | None, reached: bool) -> dict[str, Any]:
        return {"threshold": float(cands[i]), "source": "val", "target": target, "val_sensitivity": round(float(sens[i]), 6),
                "val_specificity": round(float(spec[i]), 6), "target_reached": bool(reached)}

    def choose(mode: Mode) -> dict[str, Any]:
        if mode.target is None:  # Youden's J, the most conservative tau giving its maximum
            youden = sens + spec - 1.0
            return entry(int(np.nonzero(youden >= youden.max() - 1e-12)[0].max()), None, True)
        # Unreachable target: the best achievable value, at the most conservative tau giving it.
        rate, target = (sens, target_sensitivity) if mode.target == "sensitivity" else (spec, target_specificity)
        reached = bool((rate >= target - 1e-12).any())
        ok = np.nonzero(rate >= (target if reached else rate.max()) - 1e-12)[0]
        return entry(int(ok.max() if mode.target == "sensitivity" else ok.min()), target, reached)

    return {name: choose(mode) for name, mode in REGISTRY.items()}


def normalize_operating_points(thresholds: dict[str, Any], source: str = "given") -> dict[str, dict[str, Any]]:
    """{mode: float} or {mode: {"threshold": float, ...}} (a model card's `thresholds`) -> operating points."""
    out = {}
    for mode, value in thresholds.items():
        if mode not in MODES:
            raise DataError(f"unknown mode {mode!r} in thresholds; modes: {', '.join(MODES)}")
        entry = dict(value) if isinstance(value, dict) else {"threshold": value}
        try:
            tau = float(entry["threshold"])
        except (KeyError, TypeError, ValueError):
            raise DataError(f"thresholds[{mode!r}] has no numeric 'threshold'") from None
        if not 0.0 <= tau <= 1.0:
            raise DataError(f"thresholds[{mode!r}] = {tau} is outside [0, 1]")
        entry["threshold"] = tau
        entry.setdefault("source", source)
        out[mode] = entry
    if not out:
        raise DataError("no operating thresholds given")
    return out

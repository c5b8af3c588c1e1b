"""Operating modes: the one registry of modes (how each is chosen on the validation split, and its fallback
threshold) and how a threshold is resolved for a mode. Research and teaching tool, not a diagnosis.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from bone_r.dataset import EvaluationError

MODES = ("screening", "balanced", "specific")


# Used only when a model has no card: deliberately generic, documented, and reported
# as "fallback" wherever a threshold is shown.
FALLBACK_THRESHOLDS = {"screening": 0.10, "balanced": 0.25, "specific": 0.50}


def resolve_threshold(mode: str, card: dict[str, Any] | None = None, conf: float | None = None) -> tuple[float, str]:
    """(threshold, where it came from) for an operating mode.

    ``conf`` overrides the mode. Otherwise the model card's
    ``thresholds[mode]`` (chosen on the validation split), else
    `FALLBACK_THRESHOLDS`. An unknown mode is an error, never a silent default.
    """
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
    if conf is not None:
        conf = float(conf)
        if not 0.0 <= conf <= 1.0:
            raise ValueError(f"conf must lie in [0, 1], got {conf}")
        return conf, "conf"
    thresholds = (card or {}).get("thresholds") or {}
    if mode in thresholds:
        entry = thresholds[mode]
        return float(entry["threshold"] if isinstance(entry, dict) else entry), "model_card"
    return FALLBACK_THRESHOLDS[mode], "fallback"


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
    """screening / balanced / specific thresholds from image-level labels and scores (see the module doc).

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

    # Unreachable target: the best achievable value, at the most conservative tau giving it.
    reached = bool((sens >= target_sensitivity - 1e-12).any())
    ok = np.nonzero(sens >= (target_sensitivity if reached else sens.max()) - 1e-12)[0]
    screening = entry(int(ok.max()), target_sensitivity, reached)
    youden = sens + spec - 1.0
    best = np.nonzero(youden >= youden.max() - 1e-12)[0]
    balanced = entry(int(best.max()), None, True)
    reached = bool((spec >= target_specificity - 1e-12).any())
    ok = np.nonzero(spec >= (target_specificity if reached else spec.max()) - 1e-12)[0]
    specific = entry(int(ok.min()), target_specificity, reached)
    return {"screening": screening, "balanced": balanced, "specific": specific}


def normalize_operating_points(thresholds: dict[str, Any], source: str = "given") -> dict[str, dict[str, Any]]:
    """{mode: float} or {mode: {"threshold": float, ...}} (a model card's `thresholds`) -> operating points."""
    out = {}
    for mode, value in thresholds.items():
        if mode not in MODES:
            raise EvaluationError(f"unknown mode {mode!r} in thresholds; modes: {', '.join(MODES)}")
        entry = dict(value) if isinstance(value, dict) else {"threshold": value}
        try:
            tau = float(entry["threshold"])
        except (KeyError, TypeError, ValueError):
            raise EvaluationError(f"thresholds[{mode!r}] has no numeric 'threshold'") from None
        if not 0.0 <= tau <= 1.0:
            raise EvaluationError(f"thresholds[{mode!r}] = {tau} is outside [0, 1]")
        entry["threshold"] = tau
        entry.setdefault("source", source)
        out[mode] = entry
    if not out:
        raise EvaluationError("no operating thresholds given")
    return out

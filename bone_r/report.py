"""Reports: evaluation reports as text, JSON and plots, and the number formats every table of the project uses.
Research and teaching tool, not a diagnosis.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from bone_r import site
from bone_r.dataset import DataError
from bone_r.detection import BoxRule
from bone_r.metrics import jsonable
from bone_r.modes import normalize_operating_points
from bone_r.runs import read_json


def num(x: Any, digits: int = 3) -> str:
    """The one number format of every table: 'n/a' for None, a float to `digits` places, anything else as is."""
    if x is None:
        return "n/a"
    if isinstance(x, (float, np.floating)):
        return f"{x:.{digits}f}"
    return str(x)


def with_ci(entry: dict[str, Any] | None, *, ci_digits: int = 3, dash: str = "-", note: bool = True) -> str:
    """'0.753 [0.690-0.814]' from a metric {'value', 'ci', 'note'} (evaluate.py's rates); without an interval its
    note in parentheses (`note`), e.g. 'too few (n=3) for an interval'; 'n/a' when undefined."""
    if not entry or entry.get("value") is None:
        return "n/a"
    ci = entry.get("ci")
    text = f"{entry['value']:.3f}"
    if ci:
        return text + f" [{ci[0]:.{ci_digits}f}{dash}{ci[1]:.{ci_digits}f}]"
    return text + (f" ({entry['note']})" if note and entry.get("note") else "")


def map50_text(box: dict[str, Any], dash: str = "-") -> str:
    """'0.424 [0.344-0.503]': a report's box mAP@0.5 with its group-bootstrap interval when it has one."""
    return with_ci({"value": box.get("map50"), "ci": (box.get("map50_interval") or {}).get("ci")}, dash=dash, note=False)


def _part_table(title: str, parts: dict[str, Any]) -> list[str]:
    lines = ["", title, f"{'':<22} {'images':>7} {'pos':>5} {'boxes':>6} {'mAP50 [95% CI]':<20} {'AUC':>6} "
                        f"{'sensitivity [95% CI]':<32} {'specificity [95% CI]':<32}"]
    for name, part in parts.items():
        bal = part["image_level"].get("balanced") or next(iter(part["image_level"].values()))
        lines.append(f"{name[:22]:<22} {part['n_images']:>7} {part['n_positive']:>5} {part['n_gt_boxes']:>6} "
                     f"{map50_text(part['box']):<20} {num(part.get('image_auc')):>6} {with_ci(bal['sensitivity']):<32} "
                     f"{with_ci(bal['specificity']):<32}")
    return lines


def format_report(report: dict[str, Any]) -> str:
    """The console table: per source first (each radiograph once), then the pooled numbers."""
    lines = [f"split {report['split']} of {report['data']}: {report['n_images']} images, {report['n_positive']} positive, "
             f"{report['n_groups']} groups"]
    if report.get("by_source_radiographs"):
        lines += _part_table("by source, each radiograph once (balanced mode)", report["by_source_radiographs"])
        mean = report["mean_over_sources"]
        lines.append(f"{'mean over sources':<22} {'':>7} {'':>5} {'':>6} {num(mean['map50']['value']):<20} "
                     f"{num(mean['image_auc']['value']):>6} {num(mean['sensitivity']['value']):<32} "
                     f"{num(mean['specificity']['value']):<32}")
    lines += ["", f"pooled over every source and copy ({report['n_images']} images):",
              f"box: mAP@0.5 {map50_text(report['box'])}  mAP@0.5:0.95 {num(report['box']['map50_95'])}  "
              f"({report['box']['n_gt_boxes']} true boxes)   image ROC AUC {num(report['image_auc']['roc_auc'])}",
              f"{'mode':<10} {'tau':>7} {'from':<10} {'sensitivity [95% CI]':<24} {'specificity [95% CI]':<24} {'PPV':>6} {'NPV':>6} "
              f"{'TP':>5} {'FP':>5} {'TN':>5} {'FN':>5} {'loc.sens':>8} {'boxes/flagged p90':>17}"]
    for mode, res in report["image_level"].items():
        op = report["operating_points"][mode]
        loc = report["localization"].get(mode, {}).get("sensitivity")
        per = (report.get("boxes_per_flagged_image") or {}).get(mode) or {}
        lines.append(f"{mode:<10} {op['threshold']:>7.4f} {op.get('source', ''):<10} {with_ci(res['sensitivity']):<24} "
                     f"{with_ci(res['specificity']):<24} {num(res['ppv']['value']):>6} {num(res['npv']['value']):>6} "
                     f"{res['tp']:>5} {res['fp']:>5} {res['tn']:>5} {res['fn']:>5} {num((loc or {}).get('value')):>8} "
                     f"{num(per.get('p90'), 1):>17}")
    for title in ("by_source", "by_region"):
        if report.get(title):
            lines += _part_table(f"{title.replace('_', ' ')}, every image (balanced mode)", report[title])
    sizes = report.get("by_fracture_size")
    if sizes and sizes["by_source"]:
        lines += ["", f"sensitivity by fracture size (balanced mode; each radiograph once; positives sorted by "
                      f"{sizes['area']}, cut in {len(next(iter(sizes['by_source'].values())))}: flagged / found at IoU >= {sizes['iou']})"]
        for source, rows in sizes["by_source"].items():
            cells = [f"{100 * r['area_min']:.2f}-{100 * r['area_max']:.2f}% n={r['n']}: {with_ci(r['flagged'])} / "
                     f"{r['found']['value']:.2f}" for r in rows]
            lines.append(f"{source[:22]:<22} " + "   ".join(cells))
    if report.get("box_rule"):
        lines.append(f"box rule: {BoxRule(**report['box_rule']['rule'])} (from {report['box_rule']['source']})")
    for note in report.get("notes", []):
        lines.append(f"note: {note}")
    if report.get("errors"):
        lines.append(f"errors: {len(report['errors'])} (see the report's 'errors')")
    return "\n".join(lines)


def save_plots(report: dict[str, Any], out_dir: str | Path, stem: str = "report") -> list[Path]:
    """PR curves (image level and box level at IoU 0.5) and the FROC curve as PNG files."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    fig, ax = plt.subplots(figsize=(5.5, 4.5), dpi=100)
    img = report["pr_curve"]["image"]
    box = report["pr_curve"]["box_iou50"]
    if img:
        ax.plot([p["recall"] for p in img], [p["precision"] for p in img], label="image level", color="#0072B2")
    if box:
        ax.plot([p["recall"] for p in box], [p["precision"] for p in box], label=f"boxes, IoU 0.5 (AP {num(report['box']['map50'])})", color="#D55E00")
    for mode, res in report["image_level"].items():
        sens, ppv = res["sensitivity"]["value"], res["ppv"]["value"]
        if sens is not None and ppv is not None:
            ax.scatter([sens], [ppv], s=25, zorder=3)
            ax.annotate(mode, (sens, ppv), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set(xlabel="recall (sensitivity)", ylabel="precision (PPV)", xlim=(0, 1.02), ylim=(0, 1.02), title=f"precision-recall, {report['split']}")
    ax.grid(alpha=0.3)
    if img or box:
        ax.legend(loc="lower left", fontsize=8)
    path = out_dir / f"{stem}_pr.png"
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    written.append(path)

    fig, ax = plt.subplots(figsize=(5.5, 4.5), dpi=100)
    pts = [p for p in report["froc"] if p["sensitivity"] is not None and p["fp_per_image"] is not None]
    if pts:
        ax.plot([p["fp_per_image"] for p in pts], [p["sensitivity"] for p in pts], marker=".", color="#009E73")
        if max(p["fp_per_image"] for p in pts) > 0:
            ax.set_xscale("symlog", linthresh=0.1)
    ax.set(xlabel="false-positive boxes per image", ylabel="lesion sensitivity", ylim=(0, 1.02),
           title=f"FROC (IoU >= {report['localization']['iou']}), {report['split']}")
    ax.grid(alpha=0.3)
    path = out_dir / f"{stem}_froc.png"
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    written.append(path)
    return written


def write_report(report: dict[str, Any], out: str | Path) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(jsonable({k: v for k, v in report.items() if not k.startswith("_")}), indent=2) + "\n")
    site.refresh_bundle(out)  # docs/data/report.json: pages opened from disk read bundle.js
    return out


def load_thresholds_file(path: str | Path) -> dict[str, Any]:
    """Thresholds from a model card (its `thresholds`) or a JSON {mode: threshold | {threshold: ...}}."""
    path = Path(path)
    data = read_json(path, "thresholds file", DataError)
    if isinstance(data, dict) and isinstance(data.get("thresholds"), dict):
        data = data["thresholds"]
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a model card or a {{mode: threshold}} object")
    return normalize_operating_points(data, "given")

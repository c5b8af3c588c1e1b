"""Is model B better than model A? Both models' saved predictions on one split, compared on the same group resamples.

    python evaluate.py --weights A.onnx --data data/merged/dataset.yaml --box-rule card --save-predictions a.json ...
    python scripts/paired_compare.py --data data/merged/dataset.yaml --split val a.json b.json

Prints mAP@0.5 and image ROC AUC of each, B − A with a 95% interval (paired group bootstrap: the same resampled
groups for both models, so what the two share cancels) and the share of resamples in which B is not better. The
project replaces its bundled model only when that interval for val mAP@0.5 excludes zero (JOURNAL 2026-11-29).

Research and teaching tool, not a diagnosis.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from bone_r import DISCLAIMER
from bone_r.dataset import DataError, load_ground_truth
from bone_r.detection import load_records, match_predictions
from bone_r.metrics import DEFAULT_N_BOOT, paired_bootstrap


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("a", type=Path, help="model A's saved predictions (evaluate.py --save-predictions / inference.py --json)")
    p.add_argument("b", type=Path, help="model B's, on the same images")
    p.add_argument("--data", type=Path, required=True, help="the dataset yaml")
    p.add_argument("--split", default="val", help="split to compare on (default: val)")
    p.add_argument("--n-boot", type=int, default=DEFAULT_N_BOOT, help="group resamples (default %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, help="also write the result here")
    return p


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    if args.n_boot < 1:
        print("error: --n-boot must be >= 1", file=sys.stderr)
        return 2
    try:
        gt = load_ground_truth(args.data, args.split)
        preds = []
        for path in (args.a, args.b):
            matched, _, errors = match_predictions(load_records(path), gt, [path.parent])
            missing = sum(p is None for p in matched)
            if errors or missing:
                raise DataError(f"{path}: {len(errors)} problem(s), {missing} image(s) of {args.split} without a "
                                f"prediction" + (f"; {errors[0]}" if errors else ""))
            preds.append(matched)
    except (OSError, ValueError, DataError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    result = paired_bootstrap(gt, preds[0], preds[1], n_boot=args.n_boot, seed=args.seed)
    print(f"{args.split}: {result['n_images']} images, {result['n_groups']} groups, {args.n_boot} paired resamples")
    for name in ("map50", "image_auc"):
        r = result[name]
        if r["difference"] is None:
            print(f"  {name}: not defined on this split")
            continue
        print(f"  {name}: A {r['a']:.4f}  B {r['b']:.4f}  B-A {r['difference']:+.4f} [{r['ci'][0]:+.4f}, {r['ci'][1]:+.4f}]  "
              f"P(B not better) {r['p_not_better']:.3f}")
    if args.json:
        args.json.write_text(json.dumps(result | {"a": str(args.a), "b": str(args.b), "split": args.split}, indent=1))
    print(DISCLAIMER)
    return 0


if __name__ == "__main__":
    sys.exit(main())

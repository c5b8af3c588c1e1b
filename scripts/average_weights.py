"""Average the weights of several checkpoints of one detector (a "model soup"), with a model card.

    python scripts/average_weights.py weights/bone-r-default.pth runs/gpu3/weights/best.pth \\
        --out runs/soup1/weights/best.pth [--weights 0.5 0.5]

Checkpoints of one line of fine-tuning (the same start, or one continued from the
other) often average into a model at least as good as the best of them, at no cost
at prediction time. The inputs must be train_torchvision.py checkpoints of the same
network (same tensors and shapes); float16 storage is read as float32. The output is
a float32 checkpoint whose config is the first input's (its `imgsz` too: pass the
size you mean first) and whose card records what was averaged, with which weights.
Whether a soup is better is for `make candidate` / `make compare` to say, on val.
Research and teaching tool, not a diagnosis.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from bone_r.card import ModelCard, base_card, card_path_for, write_card
from bone_r.runs import display_path, save_checkpoint, sha256_file


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoints", type=Path, nargs="+", help="train_torchvision.py .pth files of one network")
    p.add_argument("--out", type=Path, required=True, help="the averaged checkpoint (a card is written beside it)")
    p.add_argument("--weights", type=float, nargs="+", default=None, help="one weight per checkpoint, summing to 1 "
                   "(default: equal)")
    args = p.parse_args(argv)

    from models.torchvision_det import CHECKPOINT_FORMAT, average_states, load_checkpoint

    if len(args.checkpoints) < 2:
        print("error: give at least two checkpoints to average", file=sys.stderr)
        return 2
    if args.out.resolve() in {c.resolve() for c in args.checkpoints}:
        print(f"error: --out {args.out} is one of the inputs (an input file is never changed)", file=sys.stderr)
        return 2
    weights = args.weights or [1.0 / len(args.checkpoints)] * len(args.checkpoints)
    first = card_path_for(args.checkpoints[0])
    try:
        old = ModelCard.load(first) if first.is_file() else ModelCard()
        if old.contract is None:
            raise ValueError(f"{first} (the first checkpoint's card) is missing or names no image contract")
        ckpts = [load_checkpoint(c) for c in args.checkpoints]
        config = ckpts[0]["config"]
        for path, ckpt in zip(args.checkpoints[1:], ckpts[1:]):
            other = {k: v for k, v in ckpt["config"].items() if k != "imgsz"}
            if other != {k: v for k, v in config.items() if k != "imgsz"}:
                raise ValueError(f"{path} is another network than {args.checkpoints[0]} (their configs differ)")
        state = average_states([c["model"] for c in ckpts], config, weights)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    sources = [{"checkpoint": display_path(path), "sha256": sha256_file(path)[:12], "weight": round(w, 6),
                "epoch": ckpt.get("epoch"), "val_map50": ckpt.get("val_map50")}
               for path, ckpt, w in zip(args.checkpoints, ckpts, weights)]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(args.out, {"format": CHECKPOINT_FORMAT, "model": state, "config": config, "epoch": None,
                               "averaged_from": sources})
    started = "the weighted average of " + ", ".join(f"{s['checkpoint']} (sha256 {s['sha256']}, weight "
                                                     f"{s['weight']:g})" for s in sources)
    card = base_card(name=args.out.parent.parent.name if args.out.parent.name == "weights" else args.out.stem,
                     backend=config["arch"], architecture=f"{config['arch']}_{config['backbone']}",
                     imgsz=config["imgsz"], contract=old.contract, started_from=started,
                     training={"averaged_from": sources, "command": "python " + " ".join(
                         [display_path(Path(sys.argv[0]))] + (argv if argv is not None else sys.argv[1:]))},
                     dataset_yaml=(old.extra.get("dataset") or {}).get("yaml"),
                     splits_sha256=(old.extra.get("dataset") or {}).get("splits_sha256"), model_config=config)
    write_card(args.out, card, keep_results=False)
    print(f"wrote {args.out} (average of {len(ckpts)}) and its card {card_path_for(args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env bash
# Train on a lent accelerator inside a fixed time budget, from a pack carried in the checkout.
#
#   scripts/gpu_train.sh PACK BUDGET_S OUT NAME [train_torchvision.py arguments ...]
#
# PACK is a folder written by `scripts/compact_tree.py pack`, or that folder as a .tar.gz (one file carries at its
# size, thousands of small ones at a disk block each), git-ignored and named in the device call's `carry`.
# The script unpacks it to an ordinary tree, trains a short probe with the same arguments (--max-images, two
# epochs: the second, warm, gives the seconds per training image and per validation on this machine), then trains
# NAME for as many epochs as fit in BUDGET_S seconds counted from its own start (the cosine schedule ends on the
# last of them); EPOCHS=N in the environment skips the probe. Whatever happens to the long run (a timeout stops it
# before the budget ends; the trainer writes the card every epoch), OUT receives what exists: NAME's float16 best
# and last weights (model only, the bundled .pth layout), train_log.csv, args.json, run.json, the card, this log.
# Choose and report on the original tree afterwards (make candidate / make compare): the pack is lossy and holds
# a subset of val.
set -uo pipefail
START=$(date +%s)
PACK=${1:?usage: scripts/gpu_train.sh PACK BUDGET_S OUT NAME [trainer args]}
BUDGET=${2:?budget in seconds}
OUT=${3:?output folder}
NAME=${4:?run name}
shift 4
PY=${PYTHON:-python3}
TREE=${TREE:-/tmp/bone-r-tree}
RUNS=${RUNS:-/tmp/bone-r-runs}
PROBE_IMAGES=${PROBE_IMAGES:-480}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/gpu_train.log") 2>&1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TORCH_ALLOW_TF32_CUBLAS_OVERRIDE=1
elapsed() { echo $(( $(date +%s) - START )); }
CORES=$(nproc)
WORKERS=$(( CORES > 2 ? CORES - 2 : 1 ))

collect() {  # what exists of the run, into OUT
    local run="$RUNS/$NAME"
    for f in train_log.csv args.json run.json; do [ -f "$run/$f" ] && cp "$run/$f" "$OUT/"; done
    [ -f "$run/weights/best.json" ] && cp "$run/weights/best.json" "$OUT/best-fp16.json"
    "$PY" - "$run/weights" "$OUT" <<'EOF'
import sys
from pathlib import Path
from models.torchvision_det import save_half_checkpoint
src, out = Path(sys.argv[1]), Path(sys.argv[2])
for name in ("best", "last"):
    if (src / f"{name}.pth").is_file():
        save_half_checkpoint(src / f"{name}.pth", out / f"{name}-fp16.pth")
        print(f"{name}: float16 copy in {out / (name + '-fp16.pth')}")
EOF
    echo "collected at $(elapsed) s of $BUDGET"
}

echo "gpu_train: $(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null || echo 'no nvidia-smi'); $CORES cores"
"$PY" -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'cuda', torch.cuda.is_available())"
if [[ "$PACK" == *.tar.gz ]]; then
    rm -rf /tmp/bone-r-pack && mkdir -p /tmp/bone-r-pack && tar -xzf "$PACK" -C /tmp/bone-r-pack || exit 2
    PACK=$(dirname "$(find /tmp/bone-r-pack -name pack.json | head -1)")
fi
"$PY" scripts/compact_tree.py unpack "$PACK" "$TREE" --workers "$CORES" --overwrite || exit 2
COMMON=(--data "$TREE/dataset.yaml" --device cuda --workers "$WORKERS" --no-cache --quiet --project "$RUNS" "$@")

if [ -z "${EPOCHS:-}" ]; then
    # two epochs: the first pays the warm-up (kernel choice for each new input size), the second gives the rate
    echo "probe: $PROBE_IMAGES images, 2 epochs (at $(elapsed) s)"
    "$PY" train_torchvision.py "${COMMON[@]}" --name "$NAME-probe" --epochs 2 --max-images "$PROBE_IMAGES" --exist-ok || exit 3
    EPOCHS=$("$PY" - "$RUNS/$NAME-probe/train_log.csv" "$TREE/dataset.yaml" "$BUDGET" "$(elapsed)" <<'EOF'
import csv, sys
from bone_r.dataset import load_ground_truth
first, warm = list(csv.DictReader(open(sys.argv[1])))[:2]
n_train = sum(im.boxes_known for im in load_ground_truth(sys.argv[2], "train").images)
val_s = float(warm["seconds"]) - float(warm["train_seconds"])
per_epoch = float(warm["sec_per_train_image"]) * n_train + val_s
warm_up = max(0.0, float(first["seconds"]) - float(warm["seconds"]))  # paid again by the long run's first epoch
left = float(sys.argv[3]) - float(sys.argv[4]) - 60 - warm_up  # 60 s: the long run's start and the collection
print(max(1, min(60, int(left // per_epoch))))
print(f"probe: {warm['sec_per_train_image']} s per training image x {n_train} + {val_s:.0f} s validation = "
      f"{per_epoch:.0f} s per epoch, {warm_up:.0f} s warm-up; {left:.0f} s left", file=sys.stderr)
EOF
    ) || exit 4
fi
echo "training $NAME for $EPOCHS epoch(s) (at $(elapsed) s)"
timeout --signal=INT $(( BUDGET - $(elapsed) - 25 )) "$PY" train_torchvision.py "${COMMON[@]}" --name "$NAME" --epochs "$EPOCHS"
echo "trainer exit $? at $(elapsed) s"
collect

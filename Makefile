# Bone-R: `make test` and `make serve` are the README's two quickstart commands.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell cat requirements.txt pyproject.toml | cksum | cut -d' ' -f1)
export YOLO_OFFLINE := 1
export YOLO_CONFIG_DIR ?= $(CURDIR)/.venv/ultralytics-config

HOST  ?= 127.0.0.1
PORT  ?= 8000
IMAGE ?=
DATA  ?= ../shared/data
OUT   ?= data/merged

EPOCHS ?= 8
IMGSZ  ?= 640
RUN    ?= finetune
TRAIN_ARGS ?=
TTA    ?= hflip
CKPT   ?= best

.PHONY: setup test test-fast serve predict dataset finetune candidate compare gpu-pack lint clean help

help:
	@echo "make test      set up .venv and run the test suite"
	@echo "make serve     set up and serve the /detect API and viewer on the bundled model (http://$(HOST):$(PORT))"
	@echo "make predict IMAGE=path   predict one image or a folder with the bundled model"
	@echo "make dataset [DATA=..] [OUT=..]   build the merged dataset from the source sets"
	@echo "make finetune [EPOCHS=8] [IMGSZ=640] [RUN=name] [TRAIN_ARGS=...]   one more warm-up + cosine cycle from the bundled model (runs/RUN)"
	@echo "make candidate RUN=name [CAND=dir] [TTA=hflip|none] [CKPT=best|final]   runs/RUN's best (or last) epoch as a bundle candidate (float16, rule, card, test)"
	@echo "make compare [CAND=dir]   candidate vs bundle on val and test (paired group bootstrap): replace when val excludes 0"
	@echo "make gpu-pack   the merged tree as carry/pack.tar.gz (WebP at 640 px, ~45 MB) for scripts/gpu_train.sh on a lent GPU"

$(STAMP): requirements.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -r requirements.txt
	@# the project itself, editable: bone_r, inference, models, app and scripts import by name from anywhere
	$(BIN)/python -m pip install -q --no-deps -e .
	rm -f $(VENV)/.installed-*
	touch $@

setup: $(STAMP) weights/bone-r-default.pth

# The bundle's PyTorch weights (float16, for `--init` and fine-tuning) are recovered from its ONNX rather than stored
# in git a second time: the same tensors exactly (tests/test_train_torchvision.py), half the git growth per bundle.
weights/bone-r-default.pth: weights/bone-r-default.onnx weights/bone-r-default.json | $(STAMP)
	$(BIN)/python scripts/onnx_to_pth.py --onnx weights/bone-r-default.onnx --out $@ --fp16

test: setup
	$(BIN)/python -m pytest -q

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow and not browser"

serve: setup
	$(BIN)/python -m uvicorn app.main:app --host $(HOST) --port $(PORT)

predict: setup
	@test -n "$(IMAGE)" || (echo "usage: make predict IMAGE=path/to/xray.png (or a folder)"; exit 2)
	@# one image -> prediction.png + prediction.json; a folder -> predictions/ (overlays) + predictions.json + predictions.csv
	if [ -d "$(IMAGE)" ]; then \
	  $(BIN)/python inference.py --image "$(IMAGE)" --out predictions --json predictions.json --csv predictions.csv; \
	else \
	  $(BIN)/python inference.py --image "$(IMAGE)" --out prediction.png --json prediction.json; \
	fi

dataset: setup
	$(BIN)/python scripts/build_dataset.py --data $(DATA) --out $(OUT) $(if $(OVERWRITE),--overwrite)

# The bundled model's training campaign goes on in cycles: each starts from weights/bone-r-default.pth with a fresh
# warm-up + cosine schedule (resumable: python train_torchvision.py --name RUN --resume). JOURNAL.md has the curve.
finetune: setup
	$(BIN)/python train_torchvision.py --data $(OUT)/dataset.yaml --arch fasterrcnn --backbone effnet_lite0_fpn --imgsz $(IMGSZ) \
	  --epochs $(EPOCHS) --batch 4 --lr 1e-4 --seed 0 --init weights/bone-r-default.pth --name $(RUN) --evaluate $(TRAIN_ARGS)

# A finished run as a bundle candidate in the bundle's layout (CAND/bone-r-default.{pth,onnx,json}): float16 .pth,
# float16-stored ONNX checked against it, box rule and thresholds chosen on val with the test-time augmentation TTA
# (the card's `tta`; hflip: image + mirror, JOURNAL 2026-11-30), test metrics in the card, and its predictions
# (records.json) for `make compare`. Then `make compare`: the replacement rule (JOURNAL 2026-11-29).
# CKPT=final takes the schedule's last epoch instead of the best by the trainer's val (with --ema, the natural pick).
CAND ?= runs/$(RUN)-candidate
BUNDLE_EVAL := runs/bundle-eval

candidate: setup
	$(BIN)/python scripts/export_onnx.py --weights runs/$(RUN)/weights/$(CKPT).pth --fp16-checkpoint $(CAND)/bone-r-default.pth \
	  --out $(CAND)/bone-r-default.onnx --store-fp16 --conf 0.001 --check $$(ls $(OUT)/images/test/* | awk 'NR%40==1')
	$(BIN)/python evaluate.py --weights $(CAND)/bone-r-default.onnx --data $(OUT)/dataset.yaml --box-rule choose --tta $(TTA) --write-card \
	  --out $(CAND)/report.json --save-predictions $(CAND)/records.json --no-plots --quiet

# the bundle's predictions on one split, with its card's rule (remade when the bundle changes)
$(BUNDLE_EVAL)/records-%.json: weights/bone-r-default.onnx weights/bone-r-default.json
	$(BIN)/python evaluate.py --weights weights/bone-r-default.onnx --data $(OUT)/dataset.yaml --split $* \
	  --out $(@D)/report-$*.json --save-predictions $@ --no-plots --quiet

compare: setup $(BUNDLE_EVAL)/records-val.json $(BUNDLE_EVAL)/records-test.json
	for split in val test; do $(BIN)/python scripts/paired_compare.py --data $(OUT)/dataset.yaml --split $$split \
	  $(BUNDLE_EVAL)/records-$$split.json $(CAND)/records.json --json $(CAND)/compare-$$split.json || exit 1; done

# The merged tree packed for a lent GPU (README "A GPU lent for minutes"): carry/pack.tar.gz, git-ignored, ~45 MB
gpu-pack: setup
	$(BIN)/python scripts/compact_tree.py pack $(OUT)/dataset.yaml carry/pack --imgsz 640 --quality 64 --val-max 300 \
	  --workers 2 --overwrite
	tar -czf carry/pack.tar.gz -C carry pack && rm -rf carry/pack

lint: setup
	$(BIN)/ruff check .

clean:
	rm -rf .pytest_cache .ruff_cache

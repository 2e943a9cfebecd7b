"""Faster R-CNN (Ren et al., NeurIPS 2015) with FPN (Lin et al., CVPR 2017): torchvision's.

DCODP's two-stage detector. Three things differ from torchvision's builder, all for pruning:

* the ResNet keeps trainable ``BatchNorm2d`` (torch-pruning cannot prune ``FrozenBatchNorm2d``);
* ``core`` returns the RPN head's outputs as well as the box head's. torchvision detaches the
  RPN branch, and the proposals feed the box head only through ``RoIAlign``; a graph traced
  through ``core`` therefore couples every FPN channel with the RPN conv's input channel and with
  its 7x7 block of ``fc6`` inputs, so a pruned FPN keeps both consistent;
* the box head runs on a *fixed* set of ``proposals`` boxes (seeded, inside the input), so FLOPs
  and ``core`` latency do not depend on the RPN's output. The number is the size's
  ``rpn_post_nms_top_n_test`` (1000 at full size, as torchvision) and is stated in the tables.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from .backbones import resnet_body
from .base import Detector, DetectorError, register
from .common import check_size

SIZES: dict[str, dict[str, Any]] = {
    # trains on the synthetic set in a few CPU minutes: anchors and proposal counts for 128 px
    "tiny": {
        "depth": 18,
        "width": 0.25,
        "fpn_channels": 64,
        "representation": 256,
        "anchor_sizes": (8, 16, 32, 64, 128),
        # RoIAlign's backward dominates a CPU training step: 100 proposals and 32 sampled RoIs
        # per image halve it against 300 / 128 (measured: 0.21 vs 0.44 s per batch of 8, 1 thread)
        "rpn_pre_nms_top_n_train": 300,
        "rpn_post_nms_top_n_train": 100,
        "rpn_pre_nms_top_n_test": 300,
        "rpn_post_nms_top_n_test": 100,
        "box_batch_size_per_image": 32,
    },
    # torchvision's fasterrcnn_resnet50_fpn (v1) with trainable BatchNorm
    "r50": {
        "depth": 50,
        "width": 1.0,
        "fpn_channels": 256,
        "representation": 1024,
        "anchor_sizes": (32, 64, 128, 256, 512),
        "rpn_pre_nms_top_n_train": 2000,
        "rpn_post_nms_top_n_train": 2000,
        "rpn_pre_nms_top_n_test": 1000,
        "rpn_post_nms_top_n_test": 1000,
        "box_batch_size_per_image": 512,
    },
}

# evaluation settings any size takes as an option (torchvision's defaults; DCODP's VOC suite
# evaluates at score 0.001 and NMS IoU 0.6)
POSTPROCESS: dict[str, Any] = {"box_score_thresh": 0.05, "box_nms_thresh": 0.5, "box_detections_per_img": 100}


def fixed_proposals(count: int, size: int, seed: int = 0) -> Tensor:
    """``count`` seeded xyxy boxes inside a ``size x size`` image, 4..size/2 pixels a side."""
    g = torch.Generator().manual_seed(seed)
    wh = 4 + torch.rand(count, 2, generator=g) * (size / 2 - 4)
    xy = torch.rand(count, 2, generator=g) * (size - wh)
    return torch.cat([xy, xy + wh], dim=1)


class FasterRCNNDetector(Detector, FasterRCNN):
    """torchvision Faster R-CNN + FPN behind the Detector contract; label 0 is its background."""

    strides = (4, 8, 16, 32, 64)  # P2..P5 and the max-pooled P6
    dynamic_batch = False  # core() pools one proposal list per image: a trace fixes their number

    def __init__(self, num_classes: int, size: str = "tiny", input_size: int = 128, **options: Any) -> None:
        check_size(size, SIZES)
        unknown = set(options) - set(SIZES[size]) - set(POSTPROCESS)
        if unknown:
            raise DetectorError(f"faster_rcnn has no option(s) {', '.join(sorted(unknown))}")
        cfg = {**SIZES[size], **POSTPROCESS, **options}
        body = resnet_body(cfg["depth"], cfg["width"])
        stages = [body.layer1, body.layer2, body.layer3, body.layer4]
        in_channels = [_out_channels(stage) for stage in stages]
        backbone = BackboneWithFPN(
            body,
            {f"layer{i}": str(i - 1) for i in range(1, 5)},
            in_channels,
            cfg["fpn_channels"],
            extra_blocks=LastLevelMaxPool(),
        )
        anchors = AnchorGenerator(tuple((s,) for s in cfg["anchor_sizes"]), ((0.5, 1.0, 2.0),) * 5)
        FasterRCNN.__init__(
            self,
            backbone,
            None,  # the box predictor below has num_classes + 1 outputs
            min_size=input_size,
            max_size=input_size,
            rpn_anchor_generator=anchors,
            box_head=TwoMLPHead(cfg["fpn_channels"] * 7 * 7, cfg["representation"]),
            box_predictor=FastRCNNPredictor(cfg["representation"], num_classes + 1),
            rpn_pre_nms_top_n_train=cfg["rpn_pre_nms_top_n_train"],
            rpn_post_nms_top_n_train=cfg["rpn_post_nms_top_n_train"],
            rpn_pre_nms_top_n_test=cfg["rpn_pre_nms_top_n_test"],
            rpn_post_nms_top_n_test=cfg["rpn_post_nms_top_n_test"],
            box_batch_size_per_image=cfg["box_batch_size_per_image"],
            box_score_thresh=cfg["box_score_thresh"],
            box_nms_thresh=cfg["box_nms_thresh"],
            box_detections_per_img=cfg["box_detections_per_img"],
        )
        self.input_size = input_size
        self.proposals = cfg["rpn_post_nms_top_n_test"]
        self.core_conditions = {"fixed proposals": self.proposals}
        self.register_buffer("core_proposals", fixed_proposals(self.proposals, input_size), persistent=False)

    def loss(self, images: list[Tensor], targets: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        return self(images, [{"boxes": t["boxes"], "labels": t["labels"] + 1} for t in targets])

    @torch.no_grad()
    def predict(self, images: list[Tensor]) -> list[dict[str, Tensor]]:
        """Post-processed detections in each image's own pixels; leaves the model in eval mode."""
        self.eval()
        return [{**p, "labels": p["labels"] - 1} for p in self(images)]

    def preprocess(self, images: list[Tensor]) -> Tensor:
        return self.transform(images)[0].tensors

    def core(self, x: Tensor) -> tuple[Tensor, ...]:
        """Backbone, FPN, RPN head, and the box head on the fixed proposals of every image."""
        features = self.backbone(x)
        objectness, deltas = self.rpn.head(list(features.values()))
        proposals = [self.core_proposals] * x.shape[0]
        pooled = self.roi_heads.box_roi_pool(features, proposals, [tuple(x.shape[-2:])] * x.shape[0])
        class_logits, box_regression = self.roi_heads.box_predictor(self.roi_heads.box_head(pooled))
        return (*objectness, *deltas, class_logits, box_regression)

    @property
    def neck(self) -> nn.Module:
        return self.backbone.fpn

    def prune_ignored(self) -> list[nn.Module]:
        return [
            self.rpn.head.cls_logits,
            self.rpn.head.bbox_pred,
            self.roi_heads.box_predictor.cls_score,
            self.roi_heads.box_predictor.bbox_pred,
        ]


def _out_channels(stage: nn.Sequential) -> int:
    last = stage[-1]
    return (last.bn3 if hasattr(last, "bn3") else last.bn2).num_features


@register("faster_rcnn")
def build_faster_rcnn(
    num_classes: int, size: str = "tiny", input_size: int = 128, **options: Any
) -> Detector:
    return FasterRCNNDetector(num_classes, size, input_size, **options)

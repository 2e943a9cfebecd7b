"""torchvision's own detection models, as its builders make them, behind the Detector contract.

The detectors researchers and engineers already hold are torchvision's: ``tv:<builder>`` builds
``torchvision.models.detection.<builder>(weights=None, weights_backbone=None)`` (nothing is
downloaded) and gives the model a Detector class over torchvision's own (``FCOS``,
``RetinaNet``, ``FasterRCNN``, ``SSD``). The module tree, its parameter names, the transform,
the forward pass and the post-processing are torchvision's, so a ``state_dict`` torchvision
saved, a published COCO weight file included, loads as it is and predicts what torchvision
predicts. Only what the harness needs is added:

* ``core``/``neck``/``strides``/``prune_ignored`` (Faster R-CNN's ``core`` is the harness's: the
  RPN head and the box head on fixed proposals, so a pruned FPN keeps both consistent);
* labels: the harness's ``0..C-1`` become torchvision's (``+1`` where label 0 is its background:
  Faster R-CNN, SSD). ``coco_labels = true`` uses torchvision's 91-slot COCO label space
  instead, where a class's output is its COCO category id, as the published weights need;
* ``min_size = max_size =`` the suite's input size (SSD: its fixed size), as for every detector,
  unless the options set them (``min_size = 800, max_size = 1333``: torchvision's evaluation);
  ``core``, FLOPs and latency stay at the square input size;
* ``frozen_norms = true``: the backbone's norms keep their statistics and affine while
  training, as torchvision's ``FrozenBatchNorm2d`` does in a pretrained build, but prunable
  (``norms.FixedBatchNorm2d``). Without it a build is torchvision's ``weights=None`` one,
  trainable ``BatchNorm2d``; either loads a frozen model's file with outputs unchanged.

GroupNorm heads (FCOS, RetinaNet v2) are pruned in whole groups by the engine
(``methods.groups``). ``from_torchvision`` wraps a model object already built in Python.
"""

from __future__ import annotations

import difflib
import functools
import inspect
from typing import Any

import torch
from torch import Tensor, nn
from torchvision.models import detection as tvd
from torchvision.models import get_model_weights
from torchvision.models.detection.ssd import SSD
from torchvision.ops import FrozenBatchNorm2d

from .base import Detector, DetectorError, register
from .faster_rcnn import FasterRCNNDetector, fixed_proposals
from .fcos import FCOSDetector
from .norms import FixedBatchNorm2d

SIZE = "full"  # torchvision's architecture as published: the family's one size
OWN_OPTIONS = {"coco_labels": bool, "frozen_norms": bool}
# builder keyword arguments the harness sets itself, or that need objects a suite cannot give
_RESERVED = {
    "self",
    "backbone",
    "num_classes",
    "size",
    "image_mean",
    "image_std",
    "anchor_generator",
    "rpn_anchor_generator",
    "head",
    "rpn_head",
    "box_roi_pool",
    "box_head",
    "box_predictor",
    "kwargs",
}


class TorchvisionDetector(Detector):
    """What every torchvision family shares: the label mapping, the transform, the strides."""

    label_offset = 0  # 1 where torchvision's label 0 is the background
    builder = ""

    def to_model_labels(self, labels: Tensor) -> Tensor:
        ids = self.coco_ids()
        return ids.to(labels.device)[labels] if ids is not None else labels + self.label_offset

    def from_model_labels(self, prediction: dict[str, Tensor]) -> dict[str, Tensor]:
        """torchvision's labels -> the harness's; slots no dataset class owns are dropped."""
        labels = prediction["labels"]
        ids = self.coco_ids()
        if ids is None:
            return {**prediction, "labels": labels - self.label_offset}
        # one slot past the highest id: labels beyond it (none from a 91-slot head) land there, as -1
        inverse = torch.full((int(ids.max()) + 2,), -1, dtype=torch.int64)
        inverse[ids] = torch.arange(len(ids))
        mapped = inverse.to(labels.device)[labels.clamp(max=len(inverse) - 1)]
        keep = mapped >= 0
        return {**{k: v[keep] for k, v in prediction.items()}, "labels": mapped[keep]}

    def coco_ids(self) -> Tensor | None:
        return coco_category_slots(self.builder) if self.spec.get("coco_labels") else None

    def loss(self, images: list[Tensor], targets: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        return self(
            images, [{"boxes": t["boxes"], "labels": self.to_model_labels(t["labels"])} for t in targets]
        )

    @torch.no_grad()
    def predict(self, images: list[Tensor]) -> list[dict[str, Tensor]]:
        """torchvision's own detections, in the harness's labels; leaves the model in eval mode."""
        self.eval()
        return [self.from_model_labels(p) for p in self(images)]

    def preprocess(self, images: list[Tensor]) -> Tensor:
        return self.transform(images)[0].tensors

    @functools.cached_property
    def strides(self) -> tuple[float, ...]:  # type: ignore[override]
        """Input size over each neck map's width, measured once (SSD's are not whole numbers)."""
        maps: list[Tensor] = []
        handle = self.neck.register_forward_hook(lambda m, i, o: maps.extend(o.values()))
        was_training = self.training
        try:
            with torch.no_grad():
                self.eval()
                self.core(self.example_input())
        finally:
            handle.remove()
            self.train(was_training)
        return tuple(
            int(s) if float(s).is_integer() else s for s in (self.input_size / m.shape[-1] for m in maps)
        )


class TorchvisionFCOS(TorchvisionDetector, FCOSDetector):
    """torchvision's FCOS: ``core``, ``neck`` and predictors as the harness's own FCOS."""


class TorchvisionFasterRCNN(TorchvisionDetector, FasterRCNNDetector):
    """torchvision's Faster R-CNN: the harness's ``core`` on fixed proposals (see faster_rcnn.py)."""

    label_offset = 1


class TorchvisionRetinaNet(TorchvisionDetector, tvd.RetinaNet):
    def core(self, x: Tensor) -> tuple[Tensor, ...]:
        out = self.head(list(self.backbone(x).values()))
        return out["cls_logits"], out["bbox_regression"]

    @property
    def neck(self) -> nn.Module:
        return self.backbone.fpn

    def prune_ignored(self) -> list[nn.Module]:
        return [self.head.classification_head.cls_logits, self.head.regression_head.bbox_reg]


class TorchvisionSSD(TorchvisionDetector, SSD):
    """SSD / SSDlite: the backbone's extra layers give the maps the head reads (no FPN)."""

    label_offset = 1
    size_divisor = 1  # no top-down merges: any input size aligns

    def core(self, x: Tensor) -> tuple[Tensor, ...]:
        out = self.head(list(self.backbone(x).values()))
        return out["cls_logits"], out["bbox_regression"]

    @property
    def neck(self) -> nn.Module:
        return self.backbone

    def prune_ignored(self) -> list[nn.Module]:
        heads = (self.head.classification_head.module_list, self.head.regression_head.module_list)
        return [_last_conv(block) for blocks in heads for block in blocks]


def _last_conv(block: nn.Module) -> nn.Module:
    return [m for m in block.modules() if isinstance(m, nn.Conv2d)][-1]


# builder -> the Detector class its model becomes
BUILDERS: dict[str, type[TorchvisionDetector]] = {
    "fcos_resnet50_fpn": TorchvisionFCOS,
    "retinanet_resnet50_fpn": TorchvisionRetinaNet,
    "retinanet_resnet50_fpn_v2": TorchvisionRetinaNet,
    "fasterrcnn_resnet50_fpn": TorchvisionFasterRCNN,
    "fasterrcnn_resnet50_fpn_v2": TorchvisionFasterRCNN,
    "fasterrcnn_mobilenet_v3_large_fpn": TorchvisionFasterRCNN,
    "ssdlite320_mobilenet_v3_large": TorchvisionSSD,
}


def published(builder: str) -> dict[str, Any]:
    """torchvision's published figures for the COCO weights of ``builder`` (read from its
    weights' metadata, never downloaded): parameters, GFLOPS (which are MACs) and box AP."""
    meta = get_model_weights(getattr(tvd, builder)).COCO_V1.meta
    return {
        "params": meta["num_params"],
        "gmacs": meta["_ops"],
        "box_ap": meta["_metrics"]["COCO-val2017"]["box_map"],
        "categories": meta["categories"],
    }


@functools.cache
def coco_category_slots(builder: str) -> Tensor:
    """The output slot of each COCO class in torchvision's 91-slot label space, in category-id
    order (the order of a COCO loader's contiguous labels): the slots not named N/A or background."""
    names = published(builder)["categories"]
    return torch.tensor([i for i, n in enumerate(names) if n not in ("__background__", "N/A")])


@functools.cache
def builder_options(builder: str) -> dict[str, Any]:
    """The scalar keyword arguments ``builder`` passes to its model class, with their defaults."""
    found = {}
    for p in inspect.signature(_model_class(builder).__init__).parameters.values():
        if p.name in _RESERVED or p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL):
            continue
        if isinstance(p.default, bool | int | float) or p.default is None:
            found[p.name] = p.default
    return found


def _model_class(builder: str) -> type[nn.Module]:
    return next(c for c in BUILDERS[builder].__mro__ if c.__module__.startswith("torchvision."))


def _same_kind(value: Any, default: Any) -> bool:
    """A value of the default's kind (a whole number for a float is fine; None takes any scalar)."""
    if default is None:
        return isinstance(value, bool | int | float | str)
    if isinstance(default, bool) or isinstance(value, bool):
        return isinstance(value, bool) and isinstance(default, bool)
    if isinstance(default, float):
        return isinstance(value, int | float)
    return isinstance(value, int)


def check_options(name: str, num_classes: int, size: str, options: dict[str, Any]) -> None:
    builder = name.removeprefix("tv:")
    if size != SIZE:
        raise DetectorError(f"{name} has one size, '{SIZE}' (torchvision's architecture), not '{size}'")
    known = {**builder_options(builder), **OWN_OPTIONS}
    for key, value in options.items():
        if key not in known:
            near = difflib.get_close_matches(key, list(known), n=1)
            hint = f" (did you mean '{near[0]}'?)" if near else ""
            raise DetectorError(f"{name} has no option '{key}'{hint}; known: {', '.join(sorted(known))}")
        default = OWN_OPTIONS[key](False) if key in OWN_OPTIONS else known[key]
        if not _same_kind(value, default):
            kinds = {bool: "true or false", int: "a whole number", float: "a number"}
            kind = kinds.get(type(default), "a number, true or false, or text")
            raise DetectorError(f"{name}: option {key} must be {kind}, not {value!r}")
    if options.get("coco_labels") and num_classes != 80:
        raise DetectorError(f"{name}: coco_labels needs the 80 COCO classes, not {num_classes}")


def build(name: str, num_classes: int, size: str, input_size: int, **options: Any) -> Detector:
    """``name`` = ``tv:<builder>``: torchvision's model with ``weights=None, weights_backbone=None``."""
    builder = name.removeprefix("tv:")
    check_options(name, num_classes, size, options)
    kwargs = {k: v for k, v in options.items() if k not in OWN_OPTIONS}
    cls = BUILDERS[builder]
    classes = 91 if options.get("coco_labels") else num_classes + cls.label_offset
    if cls is not TorchvisionSSD:  # predict() as torchvision evaluates: min_size 800, max_size 1333
        kwargs = {"min_size": input_size, "max_size": input_size, **kwargs}
    model = getattr(tvd, builder)(weights=None, weights_backbone=None, num_classes=classes, **kwargs)
    if cls is TorchvisionSSD:  # SSD resizes to a fixed size given positionally by its builder
        model.transform.min_size, model.transform.max_size = (input_size,), input_size
        model.transform.fixed_size = (input_size, input_size)
    return _adopt(model, cls, builder, input_size, options)


def _adopt(
    model: nn.Module, cls: type[TorchvisionDetector], builder: str, input_size: int, options: dict[str, Any]
) -> Detector:
    """Give torchvision's model its Detector class (same module tree, so the same state_dict)."""
    model.__class__ = cls
    model.builder = builder
    model.input_size = input_size
    model.core_conditions = {}
    if cls is TorchvisionFasterRCNN:
        model.proposals = model.rpn._post_nms_top_n["testing"]
        model.core_conditions = {"fixed proposals": model.proposals}
        model.register_buffer(
            "core_proposals", fixed_proposals(model.proposals, input_size), persistent=False
        )
    if options.get("frozen_norms"):
        body = getattr(model.backbone, "body", None)
        if body is None:
            raise DetectorError(f"tv:{builder}: torchvision freezes no norms in this backbone")
        fix_norms(body)
    return model


def fix_norms(module: nn.Module) -> None:
    """Every ``BatchNorm2d`` or torchvision ``FrozenBatchNorm2d`` under ``module`` becomes a
    prunable ``FixedBatchNorm2d`` with the same statistics, affine and epsilon (outputs unchanged)."""
    for name, child in list(module.named_children()):
        if isinstance(child, FrozenBatchNorm2d | nn.BatchNorm2d) and not isinstance(child, FixedBatchNorm2d):
            setattr(module, name, FixedBatchNorm2d.like(child))
        else:
            fix_norms(child)


def from_torchvision(model: nn.Module, builder: str, num_classes: int, coco_labels: bool = False) -> Detector:
    """A torchvision detection model built in Python (say, with its published weights) as a
    Detector: its frozen norms made prunable, its transform's sizes kept (``input_size`` is its
    shorter side). ``num_classes`` is the dataset's. A checkpoint of the result rebuilds with
    ``tv:<builder>`` and these options; other post-processing settings rebuild at their defaults."""
    if builder not in BUILDERS or type(model) is not _model_class(builder):
        raise DetectorError(f"not a torchvision {builder} model: {type(model).__name__}")
    cls, transform = BUILDERS[builder], model.transform
    options: dict[str, Any] = {"coco_labels": coco_labels}
    options["frozen_norms"] = any(isinstance(m, FrozenBatchNorm2d) for m in model.modules())
    if cls is TorchvisionSSD:
        input_size = int(transform.fixed_size[0])
    else:
        input_size = int(transform.min_size[0])
        options.update(min_size=input_size, max_size=int(transform.max_size))
    options = {k: v for k, v in options.items() if v}
    detector = _adopt(model, cls, builder, input_size, options)
    detector.spec = {
        "name": f"tv:{builder}",
        "num_classes": num_classes,
        "size": SIZE,
        "input_size": input_size,
        **options,
    }
    return detector


for _builder in BUILDERS:
    register(f"tv:{_builder}", default_size=SIZE)(functools.partial(build, f"tv:{_builder}"))

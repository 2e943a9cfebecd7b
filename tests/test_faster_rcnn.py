"""Faster R-CNN: the contract, torchvision's published size, and an FPN that prunes consistently."""

from __future__ import annotations

import pytest
import torch
import torch_pruning as tp
from torch import nn

from detectors import DetectorError, build_detector
from detectors.faster_rcnn import fixed_proposals
from methods.engine.groups import dependency_graph
from methods.engine.sizes import count_params


@pytest.fixture
def model():
    torch.manual_seed(0)
    return build_detector("faster_rcnn", 3, "tiny", 64).eval()


def test_core_returns_the_rpn_and_the_box_head_on_fixed_proposals(model) -> None:
    """What Faster R-CNN adds to the contract (``tests/test_detectors.py``)."""
    outputs = model.core(model.example_input(2))
    assert len(outputs) == 2 * len(model.strides) + 2  # RPN objectness and deltas per level
    assert outputs[-2].shape == (2 * model.proposals, 4) and outputs[-1].shape == (2 * model.proposals, 16)
    assert model.core_conditions == {"fixed proposals": model.proposals}
    with pytest.raises(DetectorError, match="no option"):
        build_detector("faster_rcnn", 3, "tiny", 64, proposal=5)


def test_fixed_proposals_lie_inside_and_repeat() -> None:
    boxes = fixed_proposals(500, 128)
    assert torch.equal(boxes, fixed_proposals(500, 128))
    assert (boxes >= 0).all() and (boxes <= 128).all()
    assert (boxes[:, 2:] - boxes[:, :2] >= 4).all()


def test_full_size_is_torchvisions_plus_trainable_batchnorm() -> None:
    # torchvision's fasterrcnn_resnet50_fpn (91 COCO labels incl. background): 41,755,286
    # parameters, with FrozenBatchNorm2d whose affine terms are buffers; here they are parameters
    model = build_detector("faster_rcnn", 90, "r50", 800)
    batchnorm = sum(
        p.numel() for m in model.modules() if isinstance(m, nn.BatchNorm2d) for p in m.parameters()
    )
    assert count_params(model) - batchnorm == 41_755_286


def test_pruning_an_fpn_channel_equals_zeroing_it_in_rpn_and_box_head(model) -> None:
    # the FPN outputs feed the shared RPN conv and, through RoIAlign and a flatten, fc6; removing
    # channel k must remove the same input channel of the RPN conv and fc6's 7x7 block of inputs
    k = 5
    zeroed = build_detector("faster_rcnn", 3, "tiny", 64).eval()
    zeroed.load_state_dict(model.state_dict())
    with torch.no_grad():
        for block in zeroed.backbone.fpn.layer_blocks:
            block[0].weight[k].zero_()
            block[0].bias[k].zero_()
    graph = dependency_graph(model)
    group = graph.get_pruning_group(
        model.backbone.fpn.layer_blocks[0][0], tp.prune_conv_out_channels, idxs=[k]
    )
    group.prune()
    assert model.rpn.head.conv[0][0].in_channels == 63
    assert model.roi_heads.box_head.fc6.in_features == 63 * 49
    x = model.example_input()
    for a, b in zip(model.core(x), zeroed.core(x), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)

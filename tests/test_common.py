"""What the detector families share (``detectors/common.py``), on hand-made inputs."""

from __future__ import annotations

import pytest
import torch

from detectors import DetectorError, build_detector
from detectors.common import check_input_size, check_size, detections, letterbox, unletterbox


def test_unletterbox_inverts_the_letterbox_scale_and_clamps_to_the_image() -> None:
    image = torch.rand(3, 32, 64)
    batch, (scale,) = letterbox([image], 128)
    assert batch.shape == (1, 3, 128, 128) and scale == 2.0
    boxes = torch.tensor([[10.0, 20.0, 60.0, 40.0], [-8.0, 30.0, 140.0, 90.0]])
    back = unletterbox(boxes, scale, image)
    torch.testing.assert_close(back, torch.tensor([[5.0, 10.0, 30.0, 20.0], [0.0, 15.0, 64.0, 32.0]]))


def test_detections_keeps_the_best_of_overlapping_boxes_per_class() -> None:
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [1.0, 1.0, 10.0, 10.0], [1.0, 1.0, 10.0, 10.0]])
    out = detections(
        boxes, torch.tensor([0.9, 0.8, 0.7]), torch.tensor([0, 0, 1]), torch.rand(3, 20, 20), 1.0, 0.5, 100
    )
    assert out["scores"].tolist() == pytest.approx([0.9, 0.7]) and out["labels"].tolist() == [0, 1]
    assert (
        len(
            detections(
                boxes,
                torch.tensor([0.9, 0.8, 0.7]),
                torch.tensor([0, 1, 2]),
                torch.rand(3, 20, 20),
                1.0,
                0.5,
                2,
            )["boxes"]
        )
        == 2
    )


def test_size_checks_name_what_is_known() -> None:
    with pytest.raises(DetectorError, match="unknown size 'xl'; known: tiny, base"):
        check_size("xl", ("tiny", "base"))
    with pytest.raises(DetectorError, match="yolox needs an input size divisible by 32, got 100"):
        check_input_size("yolox", 100)


@pytest.mark.parametrize("name", ["yolox", "yolov7", "yolov8", "yolof"])
def test_every_letterboxing_family_takes_the_same_post_processing_options(name: str) -> None:
    torch.manual_seed(0)
    image = torch.rand(3, 64, 64)
    loose = build_detector(name, 3, "tiny", 64, score_thresh=0.0, nms_thresh=1.0, detections_per_img=5)
    (out,) = loose.eval().predict([image])
    assert len(out["boxes"]) == 5  # random weights: far more than 5 candidates over a zero threshold
    strict = build_detector(name, 3, "tiny", 64, score_thresh=0.999, detections_per_img=5)
    strict.load_state_dict(loose.state_dict())
    (out,) = strict.eval().predict([image])
    assert len(out["boxes"]) < 5 and bool((out["scores"] >= 0.999).all())
    with pytest.raises(TypeError, match="score_treshold"):
        build_detector(name, 3, "tiny", 64, score_treshold=0.1)


def test_yolof_keeps_its_defaults() -> None:
    model = build_detector("yolof", 3, "tiny", 64)
    # the attribute keeps its earlier name: it is part of the network's fingerprint (cell ids)
    assert (model.score_thresh, model.nms_thresh, model.max_detections) == (0.05, 0.6, 100)

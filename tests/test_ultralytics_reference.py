"""detprune's YOLOv8 against Ultralytics' own, with Ultralytics installed (``tox -e ultralytics``).

For yolov8n and yolov8s with random weights and non-trivial BatchNorm statistics: Ultralytics'
weights read through the name map give the same raw outputs as Ultralytics' ``DetectionModel``;
detprune's Ultralytics pipeline post-processes them into the detections Ultralytics'
``non_max_suppression`` + ``scale_boxes`` give (the validator's settings); a pickled
``best.pt``-style checkpoint loads (trusted), prunes with l1 at params:0.3 and exports to ONNX
in Ultralytics' layout, which ONNX Runtime runs as PyTorch does. Skipped where Ultralytics is
not installed (``tox -e py``): it is AGPL-3.0 and an optional extra.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from detectors import build_detector, load_checkpoint, load_weights, native_state, read_weights
from detectors.common import letterbox_centered
from runners import cli, deploy

ultralytics = pytest.importorskip("ultralytics", reason="the ultralytics extra is not installed")
from ultralytics.data.augment import LetterBox  # noqa: E402
from ultralytics.nn.tasks import DetectionModel  # noqa: E402
from ultralytics.utils import nms, ops  # noqa: E402

SCALES = ["n", "s"]


def _scenes(count: int, h: int, w: int, seed: int) -> list[torch.Tensor]:
    """Images with something in them: coloured rectangles on a coloured background."""
    g = torch.Generator().manual_seed(seed)
    images = []
    for _ in range(count):
        image = torch.rand(3, 1, 1, generator=g).expand(3, h, w).clone()
        for _ in range(6):
            x0, y0 = (
                int(torch.randint(0, w - 8, (1,), generator=g)),
                int(torch.randint(0, h - 8, (1,), generator=g)),
            )
            x1, y1 = (
                x0 + int(torch.randint(8, w // 2, (1,), generator=g)),
                y0 + int(torch.randint(8, h // 2, (1,), generator=g)),
            )
            image[:, y0:y1, x0:x1] = torch.rand(3, 1, 1, generator=g)
        images.append(image)
    return images


def _theirs(scale: str, nc: int, seed: int = 0) -> DetectionModel:
    """Ultralytics' YOLOv8 with random weights and the BatchNorm statistics of real activations
    (one pass over scenes in training mode, then random affine terms): not the 0 / 1 of a new
    model, so a map that swapped two layers' tensors would show."""
    torch.manual_seed(seed)
    model = DetectionModel(f"yolov8{scale}.yaml", nc=nc, verbose=False)
    g = torch.Generator().manual_seed(seed)
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    for m in norms:
        m.momentum = 1.0  # the statistics of this one pass
    with torch.no_grad():
        model.train()(torch.stack(_scenes(4, 320, 320, seed + 1)))
        for m in norms:
            m.momentum = 0.03
            m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
        for branch in model.model[-1].cv3:  # class logits around 0: many candidates for the NMS
            branch[-1].bias.zero_()
    return model.eval()


def _ours(theirs: DetectionModel, input_size: int, **options) -> nn.Module:
    state, spec = native_state("yolov8", theirs.state_dict())
    model = build_detector("yolov8", spec["num_classes"], spec["size"], input_size, **options)
    load_weights(model, state, "ultralytics")
    return model.eval()


@pytest.mark.parametrize("scale", SCALES)
def test_raw_outputs_equal_ultralytics(scale: str) -> None:
    theirs = _theirs(scale, 80)
    ours = _ours(theirs, 320)
    x = torch.rand(2, 3, 320, 320, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y, raw = theirs(x)
        cls_logits, dist_logits = ours.core(x)
        decoded = ours.ultralytics_output(x)
    torch.testing.assert_close(cls_logits, raw["scores"].transpose(1, 2), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dist_logits, raw["boxes"].transpose(1, 2), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(decoded, y, atol=1e-4, rtol=1e-5)


def test_the_centred_letterbox_is_ultralytics_letterbox() -> None:
    rng = np.random.default_rng(0)
    for h, w in ((480, 640), (375, 500), (640, 427), (101, 59)):
        # where the image lands: a black image in a grey frame, the same pixels in both
        black = np.zeros((h, w, 3), dtype=np.uint8)
        expected = LetterBox(new_shape=(320, 320), auto=False, stride=32)(image=black)
        got, _, _ = letterbox_centered([torch.zeros(3, h, w)], 320)
        assert np.array_equal(got[0, 0].numpy() == 0, expected[..., 0] == 0)
        # what it holds: cv2 resizes uint8 pixels in fixed point, PyTorch floats
        image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        expected = LetterBox(new_shape=(320, 320), auto=False, stride=32)(image=image).astype(np.float32)
        got, _, _ = letterbox_centered([torch.from_numpy(image).permute(2, 0, 1).float() / 255], 320)
        diff = np.abs((got[0].permute(1, 2, 0) * 255).numpy() - expected)
        assert diff.max() <= 2.5 and diff.mean() < 0.5


@pytest.mark.parametrize("scale", SCALES)
def test_detections_equal_ultralytics_non_max_suppression(scale: str) -> None:
    theirs = _theirs(scale, 3)
    ours = _ours(theirs, 320, pipeline="ultralytics")
    images = [*_scenes(1, 240, 320, 2), *_scenes(1, 320, 200, 3)]
    with torch.no_grad():
        got = ours.predict(images)
        x = ours.preprocess(images)  # the same input for both: this checks the post-processing
        y, _ = theirs(x)
    kept = nms.non_max_suppression(y, conf_thres=0.001, iou_thres=0.7, multi_label=True, max_det=300)
    for image, mine, det in zip(images, got, kept, strict=True):
        boxes = ops.scale_boxes(x.shape[2:], det[:, :4].clone(), image.shape[-2:])
        assert len(mine["boxes"]) == len(det) > 10
        torch.testing.assert_close(mine["boxes"], boxes, atol=1e-4, rtol=1e-5)
        torch.testing.assert_close(mine["scores"], det[:, 4], atol=1e-4, rtol=1e-5)
        assert torch.equal(mine["labels"], det[:, 5].long())


def test_a_best_pt_prunes_and_exports_in_ultralytics_layout(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("DETPRUNE_HOME", str(tmp_path / "home"))
    theirs = _theirs("n", 3)
    theirs.names = {0: "car", 1: "pedestrian", 2: "cyclist"}
    best = tmp_path / "best.pt"
    # what Ultralytics' trainer leaves: half-precision models, the EMA the one it loads
    torch.save({"epoch": -1, "model": None, "ema": copy.deepcopy(theirs).half(), "updates": 1}, best)
    state, names = read_weights(best, trust=True)
    assert names == ["car", "pedestrian", "cyclist"] and "model.22.cv3.0.2.weight" in state

    out = tmp_path / "pruned.pt"
    argv = ["prune", "--checkpoint", str(best), "--detector", "yolov8", "--trust-checkpoint",
            "--data", "synthetic-coco", "--method", "l1", "--target", "params:0.3", "--input-size", "320",
            "--round-to", "8", "--export", "onnx", "--out", str(out)]  # fmt: skip
    assert cli.main(argv) == 0
    said = capsys.readouterr().out
    assert "pruned with l1 to params:0.3" in said and "ultralytics layout" in said
    model, _ = load_checkpoint(out)
    assert model.spec["pipeline"] == "ultralytics" and model.spec["size"] == "n"
    session = deploy.session(out.with_suffix(".onnx"), 2)
    x = torch.rand(1, 3, 320, 320, generator=torch.Generator().manual_seed(3))
    (y,) = session.run(None, {"images": x.numpy()})
    assert [o.name for o in session.get_outputs()] == ["output0"] and y.shape == (1, 4 + 3, 2100)
    with torch.no_grad():
        expected = model.eval().ultralytics_output(x)
    torch.testing.assert_close(torch.from_numpy(y), expected, atol=deploy.ATOL, rtol=deploy.RTOL)

    # Ultralytics' own loader takes the file: the names, input size and stride from its metadata,
    # and its best detection where detprune's pruned model puts it (cv2's uint8 resize aside)
    onnx_model = ultralytics.YOLO(str(out.with_suffix(".onnx")), task="detect")
    image = (_scenes(1, 240, 320, 4)[0] * 255).round().byte()
    found = onnx_model.predict(image.permute(1, 2, 0).flip(-1).numpy(), imgsz=320, conf=0.001, verbose=False)[
        0
    ]
    assert found.names == {0: "car", 1: "pedestrian", 2: "cyclist"}
    mine = model.predict([image.float() / 255])[0]
    torch.testing.assert_close(found.boxes.xyxy[0], mine["boxes"][0], atol=2.0, rtol=0.0)
    assert abs(float(found.boxes.conf[0]) - float(mine["scores"][0])) < 0.02

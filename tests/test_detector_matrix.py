"""Every registered detector prunes with every registered method, then still predicts and trains.

One cell of the matrix: tiny detector (torchvision's at their one size), 64x64 input,
``params:0.3`` with ``round_to = 1``; the pruned model must meet the budget, keep its predictor
widths, reload from its checkpoint with identical ``core`` outputs, run ``predict`` and take one
optimiser step whose loss is finite.
"""

from __future__ import annotations

import pytest
import torch

from detectors import build_detector, detector_names, load_checkpoint, save_checkpoint
from methods import PruneContext, Target, build_method, method_names
from methods.engine import prune
from methods.engine.sizes import count_params

SIZE = 64
# the fast end of each method's knobs: the matrix checks wiring, the method tests check the math
FAST_OPTIONS = {"groupfisher": {"d": 1, "channels_per_step": 64}, "px": {"rounds": 1}}
# where params:0.3 is out of a method's reach by its definition: Slimming scores only channels a
# norm scales, which hold 16.1% of this detector's parameters (its FPN convs have no norm, its
# box head is linear layers), so the cell prunes to what it can reach
TARGETS = {("tv:fasterrcnn_mobilenet_v3_large_fpn", "slimming"): "params:0.15"}


def _samples(n: int) -> list[tuple[torch.Tensor, dict[str, torch.Tensor]]]:
    g = torch.Generator().manual_seed(0)
    samples = []
    for i in range(n):
        x, y = torch.randint(0, SIZE // 2, (2,), generator=g).tolist()
        boxes = torch.tensor([[x, y, x + 20.0, y + 16.0], [4.0, 30.0, 30.0, 60.0]])
        target = {"boxes": boxes, "labels": torch.tensor([i % 3, (i + 1) % 3]), "image_id": i}
        samples.append((torch.rand(3, SIZE, SIZE, generator=g), target))
    return samples


# torchvision's models come at their one (full) size: few proposals keep Faster R-CNN's box head small
TV_OPTIONS = {
    "rpn_pre_nms_top_n_train": 50,
    "rpn_post_nms_top_n_train": 20,
    "rpn_pre_nms_top_n_test": 50,
    "rpn_post_nms_top_n_test": 20,
    "box_batch_size_per_image": 16,
}
# the full-size torchvision cells take 4 to 90 s each on the 2-core AMD EPYC (all 56: 20 min), so
# they run with -m slow; the default run prunes torchvision's models in test_torchvision_suite.py
# and test_torchvision_detectors.py (FCOS's GroupNorm groups)
FAST_TV: set[tuple[str, str]] = set()
# the YOLOv7/YOLOv8 cells of the three slowest criteria (3 to 8 s each on the 2-core AMD EPYC)
# also run with -m slow, to keep `tox -e py` under 10 minutes; their C2f / ELAN coupling tests
# prune both by default
SLOW_YOLO = {(d, m) for d in ("yolov7", "yolov8") for m in ("groupfisher", "chip", "dcodp")}


def _cells() -> list:
    cells = []
    for detector in detector_names():
        for method in method_names():
            slow = detector.startswith("tv:") and (detector, method) not in FAST_TV
            slow = slow or (detector, method) in SLOW_YOLO
            marks = [pytest.mark.slow] if slow else []
            cells.append(pytest.param(detector, method, marks=marks, id=f"{detector}-{method}"))
    return cells


def _build(detector: str):
    if not detector.startswith("tv:"):
        return build_detector(detector, 3, "tiny", SIZE)
    options = TV_OPTIONS if "fasterrcnn" in detector else {}
    return build_detector(detector, 3, None, SIZE, **options)


@pytest.mark.parametrize(("detector", "method"), _cells())
def test_detector_prunes_reloads_predicts_and_trains(detector: str, method: str, tmp_path) -> None:
    torch.manual_seed(0)
    model = _build(detector).eval()
    samples = _samples(8)
    batches = [samples[:4], samples[4:]]
    ctx = PruneContext(
        calibration=[([s[0] for s in b], [s[1] for s in b]) for b in batches],
        round_to=1,
        progress=False,
        train_set=samples,
        batch_size=4,
    )
    fixed = {id(m): m.weight.shape[0] for m in model.prune_ignored()}
    before = count_params(model)
    pruner = build_method(method, **FAST_OPTIONS.get(method, {}))
    target = Target.parse(TARGETS.get((detector, method), "params:0.3"))
    report = prune(pruner, model, ctx, target)

    assert abs(report.achieved["params"] - target.rate) <= ctx.tolerance
    assert count_params(model) == report.params_after < before
    assert {id(m): m.weight.shape[0] for m in model.prune_ignored()} == fixed

    model.eval()
    reloaded, _ = load_checkpoint(save_checkpoint(model, tmp_path / "pruned.pt"))
    x = model.example_input()
    for a, b in zip(model.core(x), reloaded.eval().core(x), strict=True):
        torch.testing.assert_close(a, b)

    images = [s[0] for s in samples[:2]]
    predictions = reloaded.predict(images)
    assert len(predictions) == 2 and all(set(p) >= {"boxes", "scores", "labels"} for p in predictions)

    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    losses = model.loss(images, [s[1] for s in samples[:2]])
    loss = sum(losses.values())
    extra = pruner.train_loss(model, ctx, (images, [s[1] for s in samples[:2]]), losses)
    loss = loss + extra if extra is not None else loss
    assert torch.isfinite(loss)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()

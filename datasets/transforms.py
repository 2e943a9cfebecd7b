"""Training-time augmentation on ``(image, target)`` samples; boxes follow the pixels."""

from __future__ import annotations

from typing import Any

import torch


class RandomHorizontalFlip:
    """Mirror the image left-right with probability ``p``, and ``boxes`` / ``ignore_boxes`` with it.

    Draws from torch's global generator, so DataLoader workers (seeded per worker) stay reproducible.
    """

    def __init__(self, p: float = 0.5) -> None:
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"p must be in [0, 1], got {p}")
        self.p = p

    def __call__(self, image: torch.Tensor, target: dict[str, Any]) -> tuple[torch.Tensor, dict[str, Any]]:
        if self.p == 0.0 or torch.rand(()).item() >= self.p:
            return image, target
        width = image.shape[-1]
        target = dict(target)  # never mutate the caller's dict
        for key in ("boxes", "ignore_boxes"):
            if key in target:
                flipped = target[key][:, [2, 1, 0, 3]].clone()
                flipped[:, [0, 2]] = width - flipped[:, [0, 2]]
                target[key] = flipped
        return image.flip(-1), target

    def __repr__(self) -> str:
        return f"RandomHorizontalFlip(p={self.p})"

"""The math of LDT (DESIGN.md §4 "LDT"), as pure functions on tensors.

Location-aware instance features, Deep LDA's scatter matrices and generalised eigenproblem, the
LD loss and the covariance penalty, the neck channels' discriminating power and the location
attention. ``methods.ldt`` only wires hooks and data to these.

Conventions: boxes are xyxy in the pixels of the tensor the network sees; a feature map of
stride ``t`` has cell ``(i, j)`` covering pixels ``[j t, (j+1) t) x [i t, (i+1) t)`` with its
centre at ``((j + 1/2) t, (i + 1/2) t)``. Everything that involves an inverse or an eigenvalue
runs in float64.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

# why a scale is skipped for a batch; the keys of the counters LDT reports
FEW_CLASSES = "few_classes"  # fewer than 2 classes present
SINGLETON_CLASS = "singleton_class"  # a class with fewer than 2 instances
SINGULAR = "singular"  # S_w not positive definite (or too ill-conditioned) in float64
NONFINITE = "nonfinite"  # a feature, a scatter or an eigenvalue is not finite
SKIP_REASONS = (FEW_CLASSES, SINGLETON_CLASS, SINGULAR, NONFINITE)

_PIVOT_FLOOR = 1e-12  # smallest Cholesky pivot^2, relative to the largest diagonal of S_w

# The well-posedness readings (DESIGN.md §4 "LDT"). With fewer instances K than channels C, S_w is
# rank deficient apart from its ridge; an absolute ridge then makes the eigenvalues along S_w's
# null space grow like (feature scale)^2 / lam, so the loss rewards growing the features.
RIDGES = (
    "absolute",  # S_w + lam I: the original reading; not scale invariant
    "within",  # S_w + lam (tr S_w / C) I: scale invariant
    "total",  # S_w + lam (tr S_t / C) I: scale invariant, and nu <= C / lam for every batch
)
TRANSFORMS = ("none", "log")  # "log": the loss averages log(1 + nu), bounded by log(1 + nu_max)


class DegenerateScatter(ValueError):
    """The discriminant analysis is undefined for this batch; ``reason`` is one of SKIP_REASONS."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


# -- location-aware instance features ---------------------------------------------------------


def box_cells(boxes: Tensor, stride: float, limit: Sequence[int] | Tensor) -> Tensor:
    """The feature cells ``[x0, x1) x [y0, y1)`` (long ``[K, 4]``, on the CPU) each box covers.

    Cells ``floor(x1 / t) .. ceil(x2 / t)`` (end exclusive), clipped to ``limit = (rows, cols)``
    (the map, or the part of it the image covers; one pair, or a ``[K, 2]`` tensor of pairs);
    a box smaller than a cell still covers the cell it starts in. Boxes must lie (at least
    partly) inside the image.
    """
    b = boxes.detach().to("cpu", torch.float64).reshape(-1, 4) / float(stride)
    lim = torch.as_tensor(limit, dtype=torch.float64).reshape(-1, 2)
    if (lim < 1).any():
        raise ValueError(f"empty feature map limit {limit}")
    rows, cols = lim[:, 0], lim[:, 1]
    x0 = torch.minimum(b[:, 0].floor().clamp(min=0), cols - 1)
    y0 = torch.minimum(b[:, 1].floor().clamp(min=0), rows - 1)
    x1 = torch.minimum(torch.maximum(b[:, 2].ceil(), x0 + 1), cols)
    y1 = torch.minimum(torch.maximum(b[:, 3].ceil(), y0 + 1), rows)
    return torch.stack([x0, y0, x1, y1], dim=1).long()


def instance_features(
    feat: Tensor, cells: Tensor, image: Tensor | Sequence[int], chunk: int = 1 << 22
) -> Tensor:
    """``f_k[c]`` = max of channel ``c`` over box ``k``'s cells: ``[K, C]``, differentiable.

    ``feat``: ``[B, C, H, W]``; ``cells``: ``[K, 4]`` from ``box_cells``; ``image[k]``: the
    batch index of box ``k``. The arg-max cells are found without gradients (masked, at most
    ``chunk`` elements at a time), then gathered, so the backward pass is one scatter per map
    (the gradient goes to one arg-max cell per channel, as ``amax`` does short of exact ties).
    """
    B, C, H, W = feat.shape
    index = torch.as_tensor(image, dtype=torch.long, device=feat.device).reshape(-1)
    K = int(cells.shape[0])
    if K == 0:
        return feat.new_zeros((0, C))
    flat = feat.flatten(2)  # [B, C, HW]
    with torch.no_grad():
        c = cells.to(feat.device)
        ys = torch.arange(H, device=feat.device)
        xs = torch.arange(W, device=feat.device)
        rows = (ys[None] >= c[:, 1:2]) & (ys[None] < c[:, 3:4])  # [K, H]
        cols = (xs[None] >= c[:, 0:1]) & (xs[None] < c[:, 2:3])  # [K, W]
        inside = (rows[:, :, None] & cols[:, None, :]).reshape(K, 1, H * W)
        step = max(1, chunk // max(1, C * H * W))
        arg = torch.cat(
            [
                flat[index[i : i + step]].masked_fill(~inside[i : i + step], float("-inf")).argmax(dim=2)
                for i in range(0, K, step)
            ]
        )  # [K, C]
    return flat[index[:, None], torch.arange(C, device=feat.device)[None, :], arg]


# -- Deep LDA ---------------------------------------------------------------------------------


def check_classes(y: Tensor) -> str | None:
    """The skip reason for labels ``y``; None when >= 2 classes are present, each >= 2 times."""
    _, counts = torch.unique(y, return_counts=True)
    if counts.numel() < 2:
        return FEW_CLASSES
    if int(counts.min()) < 2:
        return SINGLETON_CLASS
    return None


def _centred_scatter(X: Tensor) -> Tensor:
    Xc = X - X.mean(dim=0, keepdim=True)
    return Xc.T @ Xc / (X.shape[0] - 1)


def scatter_matrices(
    X: Tensor, y: Tensor, lam: float = 1e-3, ridge: str = "total"
) -> tuple[Tensor, Tensor, Tensor]:
    """Deep LDA's equal-class scatters in float64: ``(S_b, S_w + ridge, S_t)``.

    ``S_t = X̄ᵀX̄ / (K-1)``; ``S_w`` = the mean over classes of ``X̄_cᵀX̄_c / (K_c-1)``;
    ``S_b = S_t - S_w`` (before the ridge is added to ``S_w``). The ridge is ``lam I``
    (``"absolute"``) or ``lam`` times the mean variance of ``S_w`` (``"within"``) or of ``S_t``
    (``"total"``): with a relative ridge every generalised eigenvalue is unchanged when ``X`` is
    scaled, so the loss can never be lowered by growing the features. The relative ridge stays
    in the graph: the gradient is then orthogonal to ``X`` (Euler), it never pushes the scale.
    """
    if ridge not in RIDGES:
        raise ValueError(f"ridge must be one of {', '.join(RIDGES)}, not {ridge!r}")
    reason = check_classes(y)
    if reason is not None:
        raise DegenerateScatter(reason)
    X = X.to(torch.float64)
    if not torch.isfinite(X).all():
        raise DegenerateScatter(NONFINITE, "instance features")
    S_t = _centred_scatter(X)
    classes = torch.unique(y)
    S_w = torch.stack([_centred_scatter(X[y == c]) for c in classes]).mean(dim=0)
    S_b = S_t - S_w
    eye = torch.eye(X.shape[1], dtype=X.dtype, device=X.device)
    if ridge == "absolute":
        return S_b, S_w + lam * eye, S_t
    scale = (S_w if ridge == "within" else S_t).diagonal().mean()
    return S_b, S_w + (lam * scale) * eye, S_t


def _whitened(X: Tensor, y: Tensor, lam: float, ridge: str) -> tuple[Tensor, Tensor]:
    """``(L^-1 S_b L^-T, L)`` with ``L Lᵀ = S_w``: the generalised problem made symmetric."""
    S_b, S_w, _ = scatter_matrices(X, y, lam, ridge)
    L, info = torch.linalg.cholesky_ex(S_w)
    if int(info) != 0 or not torch.isfinite(L).all():
        raise DegenerateScatter(SINGULAR, "S_w is not positive definite")
    pivots = L.detach().diagonal()
    if float(pivots.min()) ** 2 <= _PIVOT_FLOOR * float(S_w.detach().diagonal().max()):
        raise DegenerateScatter(SINGULAR, "S_w is numerically singular")
    A = torch.linalg.solve_triangular(L, S_b, upper=False)  # L^-1 S_b
    M = torch.linalg.solve_triangular(L, A.T, upper=False)  # L^-1 S_b L^-T
    return (M + M.T) / 2, L


def generalized_eigvals(X: Tensor, y: Tensor, lam: float = 1e-3, ridge: str = "total") -> Tensor:
    """All ``ν`` of ``S_b v = ν S_w v``, ascending, float64, differentiable (``eigvalsh``)."""
    M, _ = _whitened(X, y, lam, ridge)
    nu = torch.linalg.eigvalsh(M)
    if not torch.isfinite(nu).all():
        raise DegenerateScatter(NONFINITE, "eigenvalues")
    return nu


def _top_count(y: Tensor, channels: int) -> int:
    """At most ``n - 1`` discriminants for ``n`` classes (and never more than the channels)."""
    return max(1, min(int(torch.unique(y).numel()) - 1, channels))


def ld_loss(
    X: Tensor,
    y: Tensor,
    epsilon: float = 1.2,
    lam: float = 1e-3,
    ridge: str = "total",
    transform: str = "log",
) -> Tensor:
    """``-mean`` of the top ``n-1`` eigenvalues that lie within ``epsilon`` of their minimum.

    ``X``: ``[K, C]`` instance features, ``y``: ``[K]`` labels. Returns a float64 scalar.
    The defaults are LDT's well-posed reading (DESIGN.md §4): a ridge relative to the total
    scatter, so ``ν_max <= C / lam``, and ``transform = "log"``, which averages ``log(1 + ν)``
    (``ν`` clamped at 0), so the loss is bounded below by ``-log(1 + ν_max)`` and its gradient by
    ``1 / (1 + ν)``; ``ridge="absolute", transform="none"`` is the ill-posed original.
    Raises ``DegenerateScatter`` where the analysis is undefined (the caller skips the scale).
    """
    return ld_loss_of_eigenvalues(generalized_eigvals(X, y, lam, ridge), y, epsilon, transform)


def ld_loss_of_eigenvalues(nu: Tensor, y: Tensor, epsilon: float = 1.2, transform: str = "log") -> Tensor:
    """``ld_loss`` from all ``C`` generalised eigenvalues ``nu`` (ascending) of labels ``y``'s
    problem: the regime computes ``nu`` once for the loss and its trajectory's top eigenvalue."""
    if transform not in TRANSFORMS:
        raise ValueError(f"transform must be one of {', '.join(TRANSFORMS)}, not {transform!r}")
    top = nu[-_top_count(y, nu.shape[0]) :]
    window = top.detach() <= top.detach().min() + epsilon
    kept = top[window]
    if transform == "log":
        kept = torch.log1p(kept.clamp(min=0))
    return -kept.mean()


def ld_loss_bound(channels: int, lam: float, transform: str = "log") -> float:
    """The lowest value ``ld_loss`` can take with ``ridge = "total"``: ``-log(1 + C / lam)``.

    ``vᵀS_b v <= vᵀS_t v <= tr(S_t) |v|²`` and the ridge adds ``lam tr(S_t) / C |v|²`` to the
    denominator, so ``ν <= C / lam`` whatever the batch.
    """
    top = channels / lam if lam > 0 else math.inf
    return -(math.log1p(top) if transform == "log" else top)


def normalise_instances(X: Tensor) -> Tensor:
    """Each instance scaled to unit length (an all-zero instance stays zero): the features then
    carry only their direction, so any scaling of one or all instances leaves the loss unchanged."""
    return X / X.norm(dim=1, keepdim=True).clamp(min=1e-12)


def covariance_penalty(X: Tensor, relative: bool = True) -> Tensor:
    """``|| S_t - diag(S_t) ||_F^2``: the squared off-diagonal total scatter, float64.

    ``relative``: divided by ``tr(S_t)^2``, which bounds it in ``[0, 1)`` (``||S||_F <= tr S``
    for a PSD ``S``) and makes it invariant to a common scaling: the raw penalty grows with the
    fourth power of the features and alone rewards shrinking them.
    """
    if X.shape[0] < 2:
        raise DegenerateScatter(FEW_CLASSES, "fewer than 2 instances")
    X = X.to(torch.float64)
    if not torch.isfinite(X).all():
        raise DegenerateScatter(NONFINITE, "instance features")
    S_t = _centred_scatter(X)
    off = S_t - torch.diag_embed(S_t.diagonal())
    penalty = (off**2).sum()
    if relative:
        penalty = penalty / S_t.diagonal().sum().square().clamp(min=1e-300)
    return penalty


def discriminants(X: Tensor, y: Tensor, lam: float = 1e-3, ridge: str = "total") -> tuple[Tensor, Tensor]:
    """The top ``n-1`` discriminants ``(ν [m], V [C, m])``, largest first, float64, no gradient.

    ``V``'s columns solve ``S_b v = ν S_w v`` with ``vᵀ S_w v = 1``. An eigenvector's sign is
    arbitrary, so each is flipped to make the mean instance project non-negatively
    (``v_jᵀ mean(X) >= 0``): the tracing objective ``D`` is then the same on every platform.
    """
    with torch.no_grad():
        X = X.detach().to(torch.float64)
        M, L = _whitened(X, y, lam, ridge)
        nu, U = torch.linalg.eigh(M)
        if not (torch.isfinite(nu).all() and torch.isfinite(U).all()):
            raise DegenerateScatter(NONFINITE, "eigenvectors")
        m = _top_count(y, X.shape[1])
        nu, U = nu[-m:].flip(0), U[:, -m:].flip(1)
        V = torch.linalg.solve_triangular(L.T, U, upper=True)  # v = L^-T u
        sign = torch.where(X.mean(dim=0) @ V < 0, -1.0, 1.0).to(V.dtype)
        return nu, V * sign


def discriminating_power(nu: Tensor, V: Tensor) -> Tensor:
    """Neck channel ``c``'s discriminating power ``Σ_j ν_j V[c, j]^2`` (``[C]``)."""
    return (V**2 * nu).sum(dim=1)


# -- location attention -----------------------------------------------------------------------


def location_attention(
    boxes: Tensor,
    shape: tuple[int, int],
    stride: float | tuple[float, float],
    a: float = 0.062,
    b: float = 7.5,
) -> Tensor:
    """``A(p) = max_k exp(-a ρ_k(p)^b)`` on an ``[H, W]`` map whose cells are ``stride`` pixels.

    ``ρ_k(p) = max(|x - cx| / (w/2), |y - cy| / (h/2))`` at cell centres, boxes in pixels
    (``stride`` may be ``(sy, sx)``). A half-side is never taken below half a cell, so a box
    thinner than a cell still attends to the cell holding its centre. No box: all zeros.
    """
    H, W = int(shape[0]), int(shape[1])
    sy, sx = (float(stride), float(stride)) if isinstance(stride, (int, float)) else map(float, stride)
    boxes = boxes.detach().to(torch.float32).reshape(-1, 4)
    if boxes.shape[0] == 0:
        return torch.zeros(H, W, device=boxes.device)
    ys = (torch.arange(H, device=boxes.device, dtype=torch.float32) + 0.5) * sy
    xs = (torch.arange(W, device=boxes.device, dtype=torch.float32) + 0.5) * sx
    cx, cy = (boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2
    hw = ((boxes[:, 2] - boxes[:, 0]) / 2).clamp(min=sx / 2)
    hh = ((boxes[:, 3] - boxes[:, 1]) / 2).clamp(min=sy / 2)
    rx = (xs[None, :] - cx[:, None]).abs() / hw[:, None]  # [K, W]
    ry = (ys[None, :] - cy[:, None]).abs() / hh[:, None]  # [K, H]
    rho = torch.maximum(ry[:, :, None], rx[:, None, :])  # [K, H, W]
    return torch.exp(-a * rho.pow(b)).amax(dim=0)


def with_head(traced: dict[Any, Tensor], det: dict[Any, Tensor]) -> tuple[dict[Any, Tensor], dict[str, Any]]:
    """``traced`` plus the layers only the detection loss reaches, on ``traced``'s footing (the
    detection scores times the median over the shared layers of mean traced / mean det); notes."""
    ratios = sorted(
        float(traced[m].mean() / det[m].mean())
        for m in traced
        if m in det and float(det[m].mean()) > 0 and float(traced[m].mean()) > 0
    )
    only = [m for m in det if m not in traced]
    notes: dict[str, Any] = {"head_layers": len(only), "shared_layers": len(ratios)}
    if not ratios or not only:
        return traced, notes
    notes["head_scale"] = scale = ratios[len(ratios) // 2]
    return traced | {m: det[m] * scale for m in only}, notes


# -- ground truth in the tensor the network sees ---------------------------------------------


@dataclass
class Instances:
    """A batch's usable ground truth in the pixels of the tensor the network sees."""

    boxes: list[Tensor]  # per image, [K_b, 4] xyxy
    labels: list[Tensor]  # per image, [K_b]
    extents: list[tuple[float, float]]  # per image, the resized image's bottom and right edges in the tensor
    tensor_hw: tuple[int, int]

    @property
    def y(self) -> Tensor:
        return torch.cat(self.labels) if self.labels else torch.zeros(0, dtype=torch.int64)

    @property
    def image(self) -> Tensor:
        """The batch index of every instance."""
        counts = torch.tensor([len(b) for b in self.boxes], dtype=torch.long)
        return torch.repeat_interleave(torch.arange(len(self.boxes)), counts)

    def cells(self, stride: float, map_hw: Sequence[int]) -> Tensor:
        """``box_cells`` of every instance, clipped to the map and to its image (not the padding)."""
        limits = [
            (
                max(1, min(int(map_hw[0]), math.ceil(h / stride))),
                max(1, min(int(map_hw[1]), math.ceil(w / stride))),
            )
            for h, w in self.extents
        ]
        counts = torch.tensor([len(b) for b in self.boxes], dtype=torch.long)
        per_box = torch.tensor(limits, dtype=torch.long).reshape(-1, 2).repeat_interleave(counts, dim=0)
        boxes = torch.cat(self.boxes) if self.boxes else torch.zeros(0, 4)
        return box_cells(boxes, stride, per_box)

    def features(self, feat: Tensor, stride: float) -> Tensor:
        """The ``[K, C]`` location-aware features of these instances on one neck map."""
        return instance_features(feat, self.cells(stride, feat.shape[-2:]), self.image)


def map_instances(
    images: Sequence[Tensor],
    targets: Sequence[dict[str, Tensor]],
    tensor_hw: Sequence[int],
    offsets: Sequence[tuple[float, float]] | None = None,
) -> tuple[Instances, int]:
    """Targets (each image's own pixels) -> boxes in the preprocessed tensor's pixels.

    Each image is scaled by ``min(T_h / H, T_w / W)``: exact for an aspect-preserving resize
    whose limiting side is not padded (torchvision's transform with ``min_size = max_size``,
    a size divisible by 32), then shifted by ``offsets`` (``Detector.input_offsets``: a centred
    letterbox's; none: the top-left corner). Boxes outside the image, inverted or not finite are
    dropped; returns the instances and how many boxes were dropped.
    """
    th, tw = int(tensor_hw[0]), int(tensor_hw[1])
    boxes, labels, extents, dropped = [], [], [], 0
    offsets = offsets if offsets is not None else [(0.0, 0.0)] * len(images)
    for image, target, (dx, dy) in zip(images, targets, offsets, strict=True):
        h, w = image.shape[-2:]
        scale = min(th / h, tw / w)
        b = target["boxes"].detach().to(torch.float32).reshape(-1, 4)
        keep = (
            torch.isfinite(b).all(dim=1)
            & (b[:, 2] >= b[:, 0])
            & (b[:, 3] >= b[:, 1])
            & (b[:, 0] < w)
            & (b[:, 1] < h)
            & (b[:, 2] > 0)
            & (b[:, 3] > 0)
        )
        dropped += int((~keep).sum())
        boxes.append(b[keep] * scale + b.new_tensor([dx, dy, dx, dy]))
        labels.append(target["labels"][keep])
        extents.append((dy + h * scale, dx + w * scale))
    return Instances(boxes, labels, extents, (th, tw)), dropped

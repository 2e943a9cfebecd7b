"""CHIP (Sui et al., NeurIPS 2021): channel independence via nuclear norms.

``CI_c = mean_n ( ||A_n||_* - ||M_c ⊙ A_n||_* )`` with ``A_n`` the ``C x HW`` flattened maps of
image n and ``M_c`` zeroing row c. A channel the others can express loses little nuclear norm
when removed: low CI, pruned first. Local scope, HRank's hook points; like HRank a single-layer
criterion, so a dependency group is scored by its root layer (DCODP sums the coupled layers).

Fast and exact: ``||A||_* = Σ sqrt(eig(A Aᵀ))`` and zeroing row c of A deletes row and column c
of the Gram matrix ``G = A Aᵀ``, so one ``C x C`` Gram matrix per image and one batched
``eigvalsh`` over its C principal submatrices (float64) replace C SVDs of ``C x HW`` matrices.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor

from .activations import FeatureMapCriterion
from .base import register


def _nuclear_from_eigenvalues(eigenvalues: Tensor, scale: Tensor) -> Tensor:
    """Σ sqrt(λ), with λ below the round-off floor of their Gram matrix counted as exact zeros."""
    floor = eigenvalues.shape[-1] * torch.finfo(eigenvalues.dtype).eps * scale
    return torch.where(eigenvalues > floor, eigenvalues, 0).sqrt().sum(dim=-1)


@contextmanager
def lapack_single_thread() -> Iterator[None]:
    """Batched small eigen-decompositions run ~100x slower with 2 threads than with 1 here
    (LAPACK's threads fight over tiny matrices), so they run on one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def nuclear_norm_drops(feats: Tensor) -> Tensor:
    """``[N, C]``: ``||A_n||_* - ||M_c ⊙ A_n||_*`` for every image n and channel c.

    ``A_n`` is ``C x HW``; its nuclear norm is Σ sqrt(λ) over the eigenvalues of either Gram
    matrix. Masking channel c leaves the ``C x C`` one's principal minor without row/column c,
    and the ``HW x HW`` one minus the rank-one ``a_c a_cᵀ``: whichever side is smaller is
    decomposed (deep, wide layers have far fewer pixels than channels at small inputs).
    """
    n, c = feats.shape[:2]
    a = feats.reshape(n, c, -1).to(torch.float64)
    pixels_side = a.shape[-1] < c
    gram = a.transpose(1, 2) @ a if pixels_side else a @ a.transpose(1, 2)  # [N, P, P], P = min(C, HW)
    keep = torch.arange(c, device=a.device).expand(c, c)
    keep = keep[~torch.eye(c, dtype=torch.bool, device=a.device)].view(c, c - 1)  # row c: every index but c
    drops = torch.empty(n, c, dtype=torch.float64, device=a.device)
    with lapack_single_thread():
        for i in range(n):  # per image bounds memory at C·P² floats
            full = torch.linalg.eigvalsh(gram[i])
            scale = full[-1].clamp(min=0)
            if pixels_side:
                masked_grams = gram[i] - a[i][:, :, None] * a[i][:, None, :]  # [C, HW, HW]
            else:
                masked_grams = gram[i][keep[:, :, None], keep[:, None, :]]  # [C, C-1, C-1]
            masked = torch.linalg.eigvalsh(masked_grams)
            drops[i] = _nuclear_from_eigenvalues(full, scale) - _nuclear_from_eigenvalues(masked, scale)
    return drops


def chip_scores(feats: Tensor) -> Tensor:
    """``CI_c = mean_n ( ||A_n||_* - ||M_c ⊙ A_n||_* )``."""
    return nuclear_norm_drops(feats).mean(dim=0)


@register("chip")
class CHIP(FeatureMapCriterion):
    reducer = staticmethod(nuclear_norm_drops)  # per-image scores; the capture averages them

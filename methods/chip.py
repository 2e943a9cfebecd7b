"""CHIP (Sui et al., NeurIPS 2021): channel independence via nuclear norms.

``CI_c = mean_n ( ||A_n||_* - ||M_c ⊙ A_n||_* )`` with ``A_n`` the ``C x HW`` flattened maps of
image n and ``M_c`` zeroing row c. A channel the others can express loses little nuclear norm
when removed: low CI, pruned first. Local scope, HRank's hook points; like HRank a single-layer
criterion, so a dependency group is scored by its root layer (DCODP sums the coupled layers).

Fast and exact: ``||A||_* = Σ sqrt(eig(A Aᵀ))`` and zeroing row c of A deletes row and column c
of the Gram matrix ``G = A Aᵀ``, so one ``C x C`` Gram matrix per image replaces C SVDs of
``C x HW`` matrices. The spectra of its C principal submatrices come either from one batched
``eigvalsh`` over them (O(C⁴) per image) or, for wide layers, from one ``eigh`` of G and C secular
equations (O(C³), ``methods.secular``); both in float64.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .engine.activations import FeatureMapCriterion
from .engine.base import register
from .secular import downdate_spectra, lapack_single_thread, minor_spectra


def _nuclear_from_eigenvalues(eigenvalues: Tensor, scale: Tensor) -> Tensor:
    """Σ sqrt(λ), with λ below the round-off floor of their Gram matrix counted as exact zeros.

    The floor is ``n·eps·λ_max`` for n eigenvalues, but at least ``32·eps·λ_max``: the secular path
    derives every masked spectrum from one decomposition of the whole Gram matrix, so an exact zero
    comes out as a few ``eps·λ_max`` — above ``n·eps·λ_max`` for the smallest n."""
    floor = max(eigenvalues.shape[-1], 32) * torch.finfo(eigenvalues.dtype).eps * scale
    return torch.where(eigenvalues > floor, eigenvalues, 0).sqrt().sum(dim=-1)


# the smaller Gram side P from which "auto" takes the secular path: measured on 2 cores, the paths
# tie at P = 64 and secular wins 2-5x at P = 96-128 (either side), 50x at C = 512
SECULAR_FROM = 64
PATHS = ("auto", "minors", "secular")


def _minor_spectra_direct(gram: Tensor, rows: Tensor, pixels_side: bool) -> tuple[Tensor, Tensor]:
    """The full spectrum and the C masked ones by one batched ``eigvalsh`` over C matrices:
    O(C·P³) per image. Kept: simplest, and fastest for small P (few LAPACK calls, no iterations)."""
    c = rows.shape[0]
    if pixels_side:
        masked_grams = gram - rows[:, :, None] * rows[:, None, :]  # [C, HW, HW]
    else:
        keep = torch.arange(c, device=gram.device).expand(c, c)
        keep = keep[~torch.eye(c, dtype=torch.bool, device=gram.device)].view(c, c - 1)  # all but c
        masked_grams = gram[keep[:, :, None], keep[:, None, :]]  # [C, C-1, C-1]
    return torch.linalg.eigvalsh(gram), torch.linalg.eigvalsh(masked_grams)


def nuclear_norm_drops(feats: Tensor, path: str = "auto") -> Tensor:
    """``[N, C]``: ``||A_n||_* - ||M_c ⊙ A_n||_*`` for every image n and channel c.

    ``A_n`` is ``C x HW``; its nuclear norm is Σ sqrt(λ) over the eigenvalues of either Gram
    matrix. Masking channel c leaves the ``C x C`` one's principal minor without row/column c,
    and the ``HW x HW`` one minus the rank-one ``a_c a_cᵀ``: whichever side is smaller is
    decomposed (deep, wide layers have far fewer pixels than channels at small inputs).

    ``path`` picks how the C masked spectra are found, both exact: ``"minors"`` decomposes the C
    masked matrices (O(C·P³) per image, P the smaller side), ``"secular"`` decomposes the Gram
    matrix once and solves C secular equations (O(P³ + C·P²), ``methods.secular``); ``"auto"``
    takes the secular path from P = ``SECULAR_FROM``, where it starts to win. They agree to ~1e-12
    of the largest drop; the secular path's eigenvalues carry an absolute error of a few
    ``eps·λ_max`` (one decomposition of the whole Gram matrix), the minors path's ``eps·||minor||``.
    """
    if path not in PATHS:
        raise ValueError(f"path must be one of {PATHS}, not {path!r}")
    n, c = feats.shape[:2]
    a = feats.reshape(n, c, -1).to(torch.float64)
    pixels_side = a.shape[-1] < c
    gram = a.transpose(1, 2) @ a if pixels_side else a @ a.transpose(1, 2)  # [N, P, P], P = min(C, HW)
    secular = path == "secular" or (path == "auto" and gram.shape[-1] >= SECULAR_FROM)
    drops = torch.empty(n, c, dtype=torch.float64, device=a.device)
    for i in range(n):  # per image bounds memory at C·P² floats
        if not secular:
            with lapack_single_thread():
                full, masked = _minor_spectra_direct(gram[i], a[i], pixels_side)
        elif pixels_side:
            full, masked = downdate_spectra(gram[i], a[i])
        else:
            full, masked = minor_spectra(gram[i])
        scale = full[-1].clamp(min=0)
        drops[i] = _nuclear_from_eigenvalues(full, scale) - _nuclear_from_eigenvalues(masked, scale)
    return drops


def chip_scores(feats: Tensor) -> Tensor:
    """``CI_c = mean_n ( ||A_n||_* - ||M_c ⊙ A_n||_* )``."""
    return nuclear_norm_drops(feats).mean(dim=0)


@register("chip")
class CHIP(FeatureMapCriterion):
    reducer = staticmethod(nuclear_norm_drops)  # per-image scores; the capture averages them

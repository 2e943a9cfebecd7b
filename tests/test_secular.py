"""The secular path of CHIP and DCODP's nuclear-norm drops (``methods.secular``): the spectra of
every principal minor and every rank-one downdate against explicit decompositions, and the drops
against the naive SVD loop and the minors path — to 1e-9 of the layer's largest drop — on
random, rank-deficient, duplicated-channel and zero-channel maps, both Gram sides, up to C = 512.
"""

from __future__ import annotations

import pytest
import torch

import methods.secular
from methods.chip import nuclear_norm_drops
from methods.secular import downdate_spectra, minor_spectra, secular_roots
from tests.test_feature_criteria import naive_nuclear_drops

RTOL = 1e-9
KINDS = ["random", "relu", "rank-deficient", "duplicates", "zero-channels", "all-at-once"]


def _close(got: torch.Tensor, want: torch.Tensor, rtol: float = RTOL) -> None:
    """Equal to ``rtol`` relative, or ``rtol`` of the largest entry (drops of 0 have no relative)."""
    torch.testing.assert_close(got, want, rtol=rtol, atol=rtol * want.abs().max().item())


def _maps(kind: str, n: int, c: int, hw: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(n, c, hw, hw, generator=g, dtype=torch.float64)
    if kind in ("relu", "all-at-once"):
        feats = feats.clamp(min=0)
    if kind == "rank-deficient":  # c channels spanning a third of the smaller side's directions
        rank = max(1, min(c, hw * hw) // 3)
        basis = torch.randn(n, rank, hw * hw, generator=g, dtype=torch.float64)
        mix = torch.randn(c, rank, generator=g, dtype=torch.float64)
        feats = (mix @ basis).reshape(n, c, hw, hw)
    if kind in ("duplicates", "all-at-once"):  # a triple and a pair: repeated eigen-structure
        feats[:, 3] = feats[:, 1]
        feats[:, 5] = feats[:, 1]
        feats[:, c - 1] = feats[:, 2]
    if kind in ("zero-channels", "all-at-once"):
        feats[:, 4] = 0
        feats[:, c - 2] = 0
    return feats


def _householder_to(q: torch.Tensor) -> torch.Tensor:
    """An orthogonal M with ``M e_0 = q`` (q a unit vector)."""
    v = q.clone()
    v[0] -= 1
    if v.norm() < 1e-12:
        return torch.eye(len(q), dtype=q.dtype)
    v = v / v.norm()
    return torch.eye(len(q), dtype=q.dtype) - 2 * torch.outer(v, v)


def test_secular_roots_are_the_minor_spectrum_with_ties_and_zero_weights() -> None:
    """``(Mᵀ Λ M)`` without row and column 0 is the minor whose secular weights are ``q = M e_0``;
    exact ties in Λ and exact zeros in q are the deflation cases."""
    lam = torch.tensor([0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 5.0, 7.0, 7.0, 10.0, 10.5], dtype=torch.float64)
    g = torch.Generator().manual_seed(1)
    weights = []
    for zeros in ([], [0], [2, 3], [6, 9, 10], [0, 1, 2, 3, 4, 5, 7, 8, 9, 10], list(range(1, 11))):
        q = torch.randn(len(lam), generator=g, dtype=torch.float64)
        q[zeros] = 0
        weights.append(q / q.norm())
    want = []
    for q in weights:
        m = _householder_to(q)
        want.append(torch.linalg.eigvalsh((m.T @ torch.diag(lam) @ m)[1:, 1:]))
    got = secular_roots(lam, torch.stack(weights))
    torch.testing.assert_close(got, torch.stack(want), rtol=0, atol=1e-12 * lam.max().item())


@pytest.mark.parametrize("kind", KINDS)
def test_minor_and_downdate_spectra_equal_explicit_decompositions(kind: str) -> None:
    a = _maps(kind, 1, 12, 4)[0].reshape(12, -1)  # 16 pixels: both Gram matrices
    lam, masked = minor_spectra(a @ a.T)
    keep = [[j for j in range(12) if j != c] for c in range(12)]
    minors = torch.stack([torch.linalg.eigvalsh((a @ a.T)[k][:, k]) for k in keep])
    scale = lam.max().item()
    torch.testing.assert_close(masked, minors, rtol=0, atol=1e-12 * scale)
    lam_p, masked_p = downdate_spectra(a.T @ a, a)
    downdates = torch.linalg.eigvalsh(a.T @ a - a[:, :, None] * a[:, None, :])
    torch.testing.assert_close(masked_p, downdates, rtol=0, atol=1e-12 * scale)
    torch.testing.assert_close(lam_p.max(), lam.max(), rtol=1e-12, atol=0)


@pytest.mark.parametrize("hw", [5, 3])  # 25 pixels > 12 channels: the channel side; 9 < 12: pixels
@pytest.mark.parametrize("kind", KINDS)
def test_secular_path_equals_naive_loop_and_minors_path(kind: str, hw: int) -> None:
    feats = _maps(kind, 3, 12, hw, seed=3)
    secular = nuclear_norm_drops(feats, path="secular")
    _close(secular, naive_nuclear_drops(feats))
    _close(secular, nuclear_norm_drops(feats, path="minors"))


@pytest.mark.parametrize("kind", ["relu", "all-at-once"])
def test_secular_path_at_64_channels(kind: str) -> None:
    feats = _maps(kind, 2, 64, 9)  # 81 pixels: the channel side
    secular = nuclear_norm_drops(feats, path="secular")
    _close(secular, naive_nuclear_drops(feats))
    _close(secular, nuclear_norm_drops(feats, path="minors"))
    _close(nuclear_norm_drops(feats), secular, rtol=0)  # auto takes it at 64


@pytest.mark.parametrize("near_max", [0, 1, 16])  # 0: every gap evaluated directly; 1: mostly
@pytest.mark.parametrize("hw", [11, 7])  # 121 pixels: the channel side; 49 < 96: pixels
def test_direct_and_expanded_evaluations_agree(monkeypatch, near_max: int, hw: int) -> None:
    """f is summed over all poles (direct) or near poles plus a series for the far ones."""
    monkeypatch.setattr(methods.secular, "_NEAR_MAX", near_max)
    feats = _maps("all-at-once", 2, 96, hw)
    secular = nuclear_norm_drops(feats, path="secular")
    _close(secular, nuclear_norm_drops(feats, path="minors"))
    if hw == 7:
        _close(secular, naive_nuclear_drops(feats))


def test_secular_path_at_512_channels_pixel_side() -> None:
    feats = _maps("all-at-once", 1, 512, 4)  # 16 pixels: 512 rank-one downdates of a 16 x 16 Gram
    secular = nuclear_norm_drops(feats, path="secular")
    _close(secular, naive_nuclear_drops(feats))
    _close(secular, nuclear_norm_drops(feats, path="minors"))


def test_secular_path_at_512_channels_channel_side() -> None:
    """The naive loop and the minors path cost C SVDs / C eigvalsh of ~512² matrices per image:
    checked on a few channels (duplicated, zero, plain) of the full secular result."""
    feats = _maps("all-at-once", 1, 512, 24)  # 576 pixels: 512 minors of a 512 x 512 Gram
    secular = nuclear_norm_drops(feats, path="secular")[0]
    a = feats[0].reshape(512, -1)
    full = torch.linalg.matrix_norm(a, "nuc")
    channels = [1, 3, 2, 511, 4, 510, 0, 100, 300]
    naive = []
    for c in channels:
        masked = a.clone()
        masked[c] = 0
        naive.append(full - torch.linalg.matrix_norm(masked, "nuc"))
    _close(secular[channels], torch.stack(naive))
    assert secular[4] == pytest.approx(0, abs=RTOL * secular.abs().max().item())
    torch.testing.assert_close(secular[3], secular[1], rtol=RTOL, atol=0)  # a triple: same drop


@pytest.mark.slow
def test_secular_path_equals_minors_path_at_512_channels() -> None:
    feats = _maps("all-at-once", 1, 512, 24)
    _close(nuclear_norm_drops(feats, path="secular"), nuclear_norm_drops(feats, path="minors"))


def test_path_is_checked() -> None:
    with pytest.raises(ValueError, match="path"):
        nuclear_norm_drops(_maps("random", 1, 4, 3), path="svd")

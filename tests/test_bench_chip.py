"""Benchmark (``tox -e bench``, not part of the tests): scoring one layer with CHIP's fast
Gram/eigvalsh path against the naive per-channel SVD loop — C = 256, 40x40 maps, 32 images.

The naive loop costs ~C SVDs of a C x 1600 matrix per image, minutes for 32 images, so it is
timed on the first 4 images and compared per image; its scores are checked against the fast
path's on those images.
"""

from __future__ import annotations

import pytest
import torch

from methods.chip import nuclear_norm_drops
from tests.test_feature_criteria import naive_nuclear_drops

pytestmark = pytest.mark.bench
NAIVE_IMAGES = 4


@pytest.fixture(scope="module")
def layer_maps() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randn(32, 256, 40, 40, generator=g).clamp(min=0)  # post-ReLU maps


def test_chip_fast_path_32_images(benchmark, layer_maps) -> None:
    drops = benchmark.pedantic(nuclear_norm_drops, args=(layer_maps,), rounds=3, iterations=1)
    assert drops.shape == (32, 256)


def test_chip_naive_svd_loop_4_images(benchmark, layer_maps) -> None:
    subset = layer_maps[:NAIVE_IMAGES]
    naive = benchmark.pedantic(naive_nuclear_drops, args=(subset,), rounds=1, iterations=1)
    fast = nuclear_norm_drops(subset)
    torch.testing.assert_close(fast, naive, rtol=1e-6, atol=1e-6 * naive.abs().max().item())

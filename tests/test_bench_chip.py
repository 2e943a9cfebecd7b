"""Benchmark (``tox -e bench``, not part of the tests): scoring one layer for CHIP/DCODP three ways
on the same post-ReLU 40x40 maps at C = 64, 128, 256, 512 —

* ``naive``: C SVDs of the masked ``C x 1600`` map per image (the definition),
* ``minors``: one Gram matrix and one batched ``eigvalsh`` over its C principal minors, O(C⁴),
* ``secular``: one ``eigh`` of the Gram matrix and C secular equations, O(C³); also timed with
  torch held to one thread (``secular 1t``), as the eigen-decompositions always are.

Each is timed per image (the naive loop on fewer images: it costs a minute at C = 512) and
checked against the secular scores on the images they share (1e-9 of the largest); the last test
prints the table of ms per image and speed-ups (and writes it to ``$DETPRUNE_BENCH_TABLE``).
"""

from __future__ import annotations

import os

import pytest
import torch

from methods.chip import nuclear_norm_drops
from methods.secular import lapack_single_thread
from tests.test_feature_criteria import naive_nuclear_drops

pytestmark = pytest.mark.bench
SIZES = [64, 128, 256, 512]
SPATIAL = 40
IMAGES = {"naive": {64: 2, 128: 2, 256: 1, 512: 1}, "minors": {64: 4, 128: 4, 256: 2, 512: 1}}
SECULAR_IMAGES = 4
ROUNDS = {"naive": 1, "minors": 1, "secular": 3, "secular 1t": 3}


def _secular_one_thread(feats: torch.Tensor) -> torch.Tensor:
    with lapack_single_thread():
        return nuclear_norm_drops(feats, path="secular")


PATHS = {
    "naive": naive_nuclear_drops,
    "minors": lambda f: nuclear_norm_drops(f, path="minors"),
    "secular": lambda f: nuclear_norm_drops(f, path="secular"),
    "secular 1t": _secular_one_thread,
}
TIMES: dict[tuple[str, int], float] = {}  # (path, C) -> seconds per image
SCORES: dict[tuple[str, int], torch.Tensor] = {}


def _maps(c: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(c)
    return torch.randn(SECULAR_IMAGES, c, SPATIAL, SPATIAL, generator=g).clamp(min=0)  # post-ReLU


@pytest.mark.parametrize("path", ["secular", "secular 1t", "minors", "naive"])
@pytest.mark.parametrize("c", SIZES)
def test_score_one_layer(benchmark, path: str, c: int) -> None:
    images = IMAGES[path][c] if path in IMAGES else SECULAR_IMAGES
    feats = _maps(c)[:images]
    scores = benchmark.pedantic(PATHS[path], args=(feats,), rounds=ROUNDS[path], iterations=1)
    assert scores.shape == (images, c)
    if benchmark.stats is not None:
        TIMES[path, c] = benchmark.stats.stats.min / images
    SCORES[path, c] = scores
    reference = SCORES.get(("secular", c))
    if path != "secular" and reference is not None:  # same maps, same scores
        shared = reference[:images]
        torch.testing.assert_close(scores, shared, rtol=1e-9, atol=1e-9 * shared.abs().max().item())


def test_report() -> None:
    threads = torch.get_num_threads()
    lines = [
        f"ms per image, post-ReLU {SPATIAL}x{SPATIAL} maps, float64, torch {torch.__version__}, "
        f"{threads} intra-op threads (the eigen-decompositions run on one)",
        "",
        "| C | naive | minors | secular | secular 1t | naive / secular | minors / secular "
        "| minors / secular 1t |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for c in SIZES:
        t = {p: TIMES.get((p, c)) for p in PATHS}

        def ms(x: float | None) -> str:
            return "-" if x is None else f"{1e3 * x:.1f}"

        def ratio(a: float | None, b: float | None) -> str:
            return "-" if a is None or b is None else f"{a / b:.0f}x"

        lines.append(
            f"| {c} | {ms(t['naive'])} | {ms(t['minors'])} | {ms(t['secular'])} | {ms(t['secular 1t'])} | "
            f"{ratio(t['naive'], t['secular'])} | {ratio(t['minors'], t['secular'])} | "
            f"{ratio(t['minors'], t['secular 1t'])} |"
        )
    table = "\n".join(lines)
    print("\n" + table)
    if os.environ.get("DETPRUNE_BENCH_TABLE"):
        with open(os.environ["DETPRUNE_BENCH_TABLE"], "w") as out:
            out.write(table + "\n")

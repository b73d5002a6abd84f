"""Per-channel k-means codebooks: optimality on easy data, weighting, storage."""

from __future__ import annotations

import pytest
import torch

from joules import formats
from joules.formats.codebook import kmeans_1d


def test_recovers_well_separated_clusters():
    g = torch.Generator().manual_seed(0)
    centers = torch.tensor([-3.0, -1.0, 1.0, 3.0])
    idx = torch.randint(0, 4, (2, 400), generator=g)
    x = centers[idx] + 0.01 * torch.randn(2, 400, generator=g)
    c = kmeans_1d(x, 4)
    assert torch.allclose(c, centers.expand(2, 4), atol=0.01)
    y = formats.get("codebook2").fake_quant(x)
    assert (y - x).abs().max() < 0.05


def test_each_row_uses_at_most_k_values_and_lloyd_beats_uniform_grid():
    x = torch.randn(8, 1024, generator=torch.Generator().manual_seed(1))
    y = formats.get("codebook3").fake_quant(x)
    assert all(int(r.unique().numel()) <= 8 for r in y)
    mse_cb = (y - x).square().mean()
    mse_int = (formats.get("int3-ch").fake_quant(x) - x).square().mean()
    assert mse_cb < mse_int  # non-uniform levels fit a bell curve better at equal code bits


def test_weights_pull_centroids():
    # Two clusters {0, 1} and {2, 3} whatever the weights; a heavy 3 pulls its centroid to it.
    x = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
    c = kmeans_1d(x, 2, torch.tensor([[1.0, 1.0, 1.0, 100.0]]))
    assert c[0].tolist() == pytest.approx([0.5, (2.0 + 300.0) / 101.0])
    assert kmeans_1d(x, 2).tolist() == [[0.5, 2.5]]  # unweighted: plain means
    y_w = formats.get("codebook2").fake_quant(x, weights=torch.tensor([[1.0, 1.0, 1.0, 1.0]]))
    assert torch.equal(y_w, formats.get("codebook2").fake_quant(x))


def test_storage_counts_the_codebooks():
    fmt = formats.get("codebook4")
    q = fmt.quantize(torch.randn(3, 100))
    assert q.parts["codebooks"].numel() == 3 * 16 and q.parts["codebooks"].dtype == torch.float16
    assert fmt.total_bits((3, 100)) == 300 * 4 + 3 * 16 * 16

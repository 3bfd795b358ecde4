"""Streaming covariance, intrinsic dimension and saturation against the invariants of spec §2.11."""

import numpy as np
import pytest
import torch

from manynets.layers.covariance import (
    StreamingCovariance,
    count_from_eigenvalues,
    intrinsic_dimension,
    layer_samples,
    saturation,
)


def isotropic_rank_k(dim: int, k: int, seed: int = 0) -> torch.Tensor:
    """A covariance with k equal eigenvalues in a random k-dim subspace of R^dim (built exactly)."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(dim, dim, dtype=torch.float64, generator=g))
    basis = q[:, :k]
    return 3.0 * basis @ basis.T


def delve_reference(cov: np.ndarray, delta: float) -> int:
    """Direct loop over k of the published rule: count k with p_k < delta (numpy eigvalsh)."""
    lam = np.clip(np.sort(np.linalg.eigvalsh(cov))[::-1], 0, None)
    if lam.sum() <= 0:
        return 0
    count, total = 0, 0.0
    for value in lam:
        total += value
        if total / lam.sum() < delta:
            count += 1
    return count


def test_isotropic_full_rank():
    assert intrinsic_dimension(torch.eye(128, dtype=torch.float64)) == 126
    assert saturation(torch.eye(128, dtype=torch.float64)) == pytest.approx(126 / 128)
    assert intrinsic_dimension(torch.eye(32, dtype=torch.float64)) == 31


@pytest.mark.parametrize("k", [2, 3, 8, 17, 50, 64, 99])
def test_isotropic_rank_k_gives_k_minus_1(k):
    cov = isotropic_rank_k(128, k, seed=k)
    assert intrinsic_dimension(cov) == k - 1
    assert saturation(cov) == pytest.approx((k - 1) / 128)


def test_rank_one_and_zero_give_zero_and_textbook_count():
    assert intrinsic_dimension(isotropic_rank_k(16, 1)) == 0
    assert intrinsic_dimension(torch.zeros(16, 16, dtype=torch.float64)) == 0
    cov = isotropic_rank_k(32, 8)
    assert intrinsic_dimension(cov, count="textbook") == 8
    assert intrinsic_dimension(cov, count="pca_layer") == 8  # spec §2.8: 8 against delve's 7
    assert intrinsic_dimension(cov) == 7


def test_random_covariances_match_direct_loop():
    rng = np.random.default_rng(0)
    for trial in range(20):
        d = int(rng.integers(2, 40))
        a = rng.normal(size=(d, d)) * rng.exponential(size=d)
        cov = a @ a.T
        delta = float(rng.choice([0.9, 0.97, 0.99, 0.999]))
        assert intrinsic_dimension(torch.from_numpy(cov), delta) == delve_reference(cov, delta), trial


def test_delta_above_one_gives_full_width():
    cov = isotropic_rank_k(20, 5)
    assert intrinsic_dimension(cov, delta=1.5) == 20
    assert intrinsic_dimension(torch.eye(7, dtype=torch.float64), delta=3.0) == 7
    with pytest.raises(ValueError, match="delta"):
        count_from_eigenvalues(torch.ones(3), delta=0.0)


def test_streaming_equals_numpy_cov_of_concatenation():
    rng = np.random.default_rng(1)
    chunks = [rng.normal(size=(n, 6)) * [1, 2, 3, 4, 5, 6] + 7 for n in (5, 13, 1, 40)]
    cov = StreamingCovariance(6)
    for c in chunks:
        cov.update(torch.from_numpy(c).float())
    all_rows = np.concatenate([c.astype(np.float32).astype(np.float64) for c in chunks])
    np.testing.assert_allclose(cov.covariance().numpy(), np.cov(all_rows, rowvar=False, bias=True), rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(cov.mean().numpy(), all_rows.mean(0), rtol=1e-12)
    assert cov.n == len(all_rows)
    cov32 = StreamingCovariance(6, matmul_dtype=torch.float32)
    for c in chunks:
        cov32.update(torch.from_numpy(c).float())
    np.testing.assert_allclose(cov32.covariance().numpy(), np.cov(all_rows, rowvar=False, bias=True), rtol=1e-4, atol=1e-3)


def test_float32_products_are_centred_per_batch():
    """A large mean next to a small spread: uncentred float32 products would cancel catastrophically; the
    products of the samples minus a shift (first batch's mean, then the running mean) do not."""
    rng = np.random.default_rng(2)
    chunks = [(rng.normal(size=(n, 4)) * [0.01, 0.02, 0.03, 0.04] + 1000).astype(np.float32) for n in (64, 7, 300)]
    all_rows = np.concatenate(chunks).astype(np.float64)
    expected = np.cov(all_rows, rowvar=False, bias=True)
    for fold_every in (256, 2):  # folded only when read / also in between batches
        cov32 = StreamingCovariance(4, matmul_dtype=torch.float32)
        cov32.FOLD_EVERY = fold_every
        for c in chunks:
            cov32.update(torch.from_numpy(c))
        np.testing.assert_allclose(cov32.covariance().numpy(), expected, rtol=1e-3, atol=1e-8)
        np.testing.assert_allclose(cov32.mean().numpy(), all_rows.mean(0), rtol=1e-12)
        assert cov32.n == len(all_rows)
        cov32.reset()
        cov32.update(torch.from_numpy(chunks[0]))
        np.testing.assert_allclose(
            cov32.covariance().numpy(), np.cov(chunks[0].astype(np.float64), rowvar=False, bias=True), rtol=1e-3, atol=1e-8
        )


def test_channelwise_conv_equals_reshape():
    x = torch.randn(3, 5, 4, 6)
    samples = layer_samples(x)
    reshaped = x.numpy().transpose(0, 2, 3, 1).reshape(-1, 5)
    np.testing.assert_array_equal(samples.numpy(), reshaped)
    cov = StreamingCovariance(5)
    cov.update(x[:2].permute(0, 2, 3, 1).reshape(-1, 5))
    cov.update(layer_samples(x[2:]))
    np.testing.assert_allclose(cov.covariance().numpy(), np.cov(reshaped.astype(np.float64), rowvar=False, bias=True), atol=1e-10)
    small = layer_samples(torch.randn(2, 3, 16, 16), downsampling=4)
    assert small.shape == (2 * 16, 3)
    assert layer_samples(x, "mean").shape == (3, 5) and layer_samples(x, "flatten").shape == (3, 120)


def test_invariant_to_rotation_and_scale():
    torch.manual_seed(0)
    x = torch.randn(500, 24, dtype=torch.float64) * torch.linspace(0.1, 3, 24, dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.randn(24, 24, dtype=torch.float64))
    base = StreamingCovariance(24)
    base.update(x)
    moved = StreamingCovariance(24)
    moved.update(17.0 * x @ q)
    for delta in (0.9, 0.99, 0.999):
        assert intrinsic_dimension(base.covariance(), delta) == intrinsic_dimension(moved.covariance(), delta)


def test_bad_input_is_named():
    with pytest.raises(ValueError, match=r"expected \(N, 4\)"):
        StreamingCovariance(4).update(torch.randn(3, 5))
    with pytest.raises(RuntimeError, match="no batch"):
        StreamingCovariance(4).covariance()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("width", [5, 67])  # 67: the float32 products in symmetric blocks
def test_conv_maps_update_equals_the_channelwise_reshape(dtype, width):
    """``update_maps`` (the (C, B*H*W) layout written once) and ``update`` of the (B*H*W, C) reshape both
    equal numpy's covariance of the concatenation, for contiguous and channels_last maps, in both product
    dtypes, folded between batches or only when read."""
    g = torch.Generator().manual_seed(3)
    spread = torch.linspace(0.5, 3.0, width)[:, None, None]
    maps = [torch.randn(b, width, 3, 4, generator=g) * spread + 50 for b in (2, 1, 6)]
    rows = np.concatenate([x.permute(0, 2, 3, 1).reshape(-1, width).double().numpy() for x in maps])
    expected = np.cov(rows, rowvar=False, bias=True)
    for fold_every in (256, 2):
        covs = [StreamingCovariance(width, matmul_dtype=dtype) for _ in range(3)]
        for cov in covs:
            cov.FOLD_EVERY = fold_every
        for x in maps:
            covs[0].update(layer_samples(x))
            covs[1].update_maps(x)
            covs[2].update_maps(x.contiguous(memory_format=torch.channels_last))
        for cov in covs:
            assert cov.n == len(rows)
            got = cov.covariance().numpy()
            np.testing.assert_allclose(got, expected, rtol=1e-4 if dtype == torch.float32 else 1e-10, atol=1e-6)
            np.testing.assert_allclose(got, got.T, rtol=1e-6, atol=1e-6)
            np.testing.assert_allclose(cov.mean().numpy(), rows.mean(0), rtol=1e-8 if dtype == torch.float32 else 1e-12)
    with pytest.raises(ValueError, match=r"expected \(B, 5, ...\)"):
        StreamingCovariance(5).update_maps(torch.randn(2, 4, 3, 3))

"""MixMo mixing blocks against the spec's invariants (§2.2, §2.3, §2.7) with independent references."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from manynets.layers.mixing import (
    cutmix_block_masks,
    cutmix_box_masks,
    member_weights,
    mix_features,
    mixing_method,
    mixmo_masks,
    msda,
    patch_probability,
    repetition_indices,
    role_permutation,
    sample_ratios,
    soft_cross_entropy,
)
from manynets.layers.temperature import cross_fit_temperature, fit_temperature
from manynets.metrics import RatioErrors


def _is_one_rectangle(mask: np.ndarray) -> bool:
    rows, cols = np.nonzero(mask.any(1))[0], np.nonzero(mask.any(0))[0]
    if len(rows) == 0:
        return True
    block = np.zeros_like(mask)
    block[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1] = 1
    return np.array_equal(mask, block)


def test_cutmix_mask_is_one_rectangle_with_mean_at_most_lambda():
    lam = torch.rand(400)
    masks = cutmix_box_masks(lam, 32, 32).numpy()
    assert set(np.unique(masks)) <= {0.0, 1.0}
    for m, l in zip(masks, lam.tolist()):
        assert _is_one_rectangle(m)
        assert m.mean() <= l + 1e-7
        side = 2 * math.floor(math.floor(32 * math.sqrt(l)) / 2)
        rows, cols = np.nonzero(m.any(1))[0], np.nonzero(m.any(0))[0]
        if len(rows):  # clipped at the border, never larger than the unclipped side
            assert len(rows) <= side and len(cols) <= side
            if 0 < rows.min() and rows.max() < 31 and 0 < cols.min() and cols.max() < 31:
                assert len(rows) == side and len(cols) == side
        else:
            assert side == 0  # a box centred inside the image is never clipped to nothing


def test_cutmix_mask_empty_below_two_pixels():
    lam = torch.full((50,), (2 / 32) ** 2 * 0.99)
    assert cutmix_box_masks(lam, 32, 32).sum() == 0


@pytest.mark.parametrize("members", [2, 3, 4])
@pytest.mark.parametrize("method", ["cutmix", "mixup"])
def test_masks_sum_to_one_and_lambda_is_mask_mean(members, method):
    lam = sample_ratios(64, members, 2.0)
    masks, lam_out = mixmo_masks(lam, (16, 16), method, torch.randperm(members).tolist())
    full = masks.expand(64, members, 16, 16)
    torch.testing.assert_close(full.sum(1), torch.ones(64, 16, 16), atol=1e-6, rtol=0)
    torch.testing.assert_close(lam_out, full.mean((-2, -1)), atol=1e-6, rtol=0)
    if method == "mixup":
        torch.testing.assert_close(masks[:, :, 0, 0], lam_out)


def test_m_greater_than_two_is_cutmix_of_a_and_mixup_of_the_rest():
    lam = torch.tensor([[0.5, 0.3, 0.2]])
    torch.manual_seed(1)
    masks, _ = mixmo_masks(lam, (32, 32), "cutmix")
    box = masks[0, 0]
    assert set(box.unique().tolist()) <= {0.0, 1.0}
    outside = 1 - box
    torch.testing.assert_close(masks[0, 1], outside * 0.3 / 0.5)
    torch.testing.assert_close(masks[0, 2], outside * 0.2 / 0.5)


def test_role_shuffle_permutes_members_for_the_whole_batch():
    lam = sample_ratios(8, 2, 2.0)
    torch.manual_seed(3)
    plain, lam_plain = mixmo_masks(lam, (8, 8), "cutmix")
    torch.manual_seed(3)
    shuffled, lam_shuffled = mixmo_masks(lam, (8, 8), "cutmix", [1, 0])
    torch.testing.assert_close(shuffled, plain[:, [1, 0]])
    torch.testing.assert_close(lam_shuffled, lam_plain[:, [1, 0]])


def test_ratios_dirichlet_and_alpha_zero():
    lam = sample_ratios(20000, 2, 2.0)
    torch.testing.assert_close(lam.sum(1), torch.ones(20000))
    # Beta(2, 2): mean 1/2, variance 1/20
    assert abs(lam[:, 0].mean().item() - 0.5) < 0.01
    assert abs(lam[:, 0].var().item() - 0.05) < 0.004
    torch.testing.assert_close(sample_ratios(5, 3, 0.0), torch.full((5, 3), 1 / 3))


def test_weights_sum_to_m_and_special_cases():
    lam = sample_ratios(100, 3, 2.0)
    for root in (1.0, 3.0):
        torch.testing.assert_close(member_weights(lam, root).sum(1), torch.full((100,), 3.0))
    torch.testing.assert_close(member_weights(lam, 1.0), 3 * lam)
    torch.testing.assert_close(member_weights(torch.full((4, 2), 0.5), 3.0), torch.ones(4, 2))
    # independent closed form for r = 3
    l = lam.numpy().astype(np.float64)
    ref = 3 * l ** (1 / 3) / (l ** (1 / 3)).sum(1, keepdims=True)
    np.testing.assert_allclose(member_weights(lam, 3.0).numpy(), ref, rtol=1e-5)
    with pytest.raises(ValueError, match="weight_root"):
        member_weights(lam, 0.0)


def test_mixup_half_reproduces_mimo_and_matches_loop():
    f = torch.randn(2, 4, 5, 6, 6)
    half = torch.full((4, 2, 1, 1), 0.5)
    torch.testing.assert_close(mix_features(f, half), f[0] + f[1])
    masks = torch.rand(4, 3, 6, 6)
    f3 = torch.randn(3, 4, 5, 6, 6)
    ref = sum(3 * masks[:, k : k + 1] * f3[k] for k in range(3))
    torch.testing.assert_close(mix_features(f3, masks), ref)


def test_patch_probability_decays_over_last_twelfth():
    assert patch_probability(0.5, 0.0) == 0.5
    assert patch_probability(0.5, 0.9) == 0.5
    assert patch_probability(0.5, 11 / 12) == pytest.approx(0.5)
    assert patch_probability(0.5, 1 - 1 / 24) == pytest.approx(0.25)
    assert patch_probability(0.5, 1.0) == 0.0


@pytest.mark.parametrize("rho", [0.0, 0.25])
def test_each_index_appears_b_times_per_member(rho):
    idx = repetition_indices(16, 3, 4, rho)
    assert idx.shape == (3, 64)
    for row in idx:
        assert torch.equal(torch.bincount(row, minlength=16), torch.full((16,), 4))
    fixed = int(rho * 64)
    assert torch.equal(idx[1, :fixed], idx[0, :fixed]) and torch.equal(idx[2, :fixed], idx[0, :fixed])
    assert not torch.equal(idx[1], idx[0])  # members see different orders
    with pytest.raises(ValueError, match="batch_repetitions"):
        repetition_indices(4, 2, 0)


def test_soft_ce_equals_cross_entropy_for_one_hot_and_numpy_for_soft():
    logits, labels = torch.randn(10, 7), torch.randint(0, 7, (10,))
    torch.testing.assert_close(soft_cross_entropy(logits, F.one_hot(labels, 7).float()), F.cross_entropy(logits, labels))
    targets = torch.rand(10, 7)
    z = logits.numpy().astype(np.float64)
    logp = z - z.max(1, keepdims=True) - np.log(np.exp(z - z.max(1, keepdims=True)).sum(1, keepdims=True))
    ref = -(targets.numpy() * logp).sum(1).mean()
    assert soft_cross_entropy(logits, targets).item() == pytest.approx(ref, rel=1e-5)


def test_soft_ce_keeps_float64_and_promotes_half():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(16, 9, generator=g, dtype=torch.float64) * 30  # large logits: float32 would lose digits
    t = torch.rand(16, 9, generator=g, dtype=torch.float64)
    zn, tn = z.numpy(), t.numpy()
    shifted = zn - zn.max(1, keepdims=True)
    ref = -(tn * (shifted - np.log(np.exp(shifted).sum(1, keepdims=True)))).sum(1).mean()
    got = soft_cross_entropy(z, t)
    assert got.dtype == torch.float64 and abs(got.item() - ref) <= 1e-13 * abs(ref)
    for low in (torch.float16, torch.bfloat16):
        assert soft_cross_entropy(z.to(low), t.float()).dtype == torch.float32


@pytest.mark.parametrize("method", ["cutmix", "mixup"])
def test_msda_labels_sum_to_one_and_match_kept_pixels(method):
    n, m, b = 8, 2, 16
    images = (torch.arange(n, dtype=torch.float32) + 1)[:, None, None, None].expand(n, 1, 16, 16).contiguous()
    labels = torch.arange(n)
    own = repetition_indices(n, m, 2)
    lam = sample_ratios(b, m, 2.0)
    masks, _ = mixmo_masks(lam, (16, 16), "cutmix")
    mixed, targets = msda(images, own, labels, masks, n, method, prob=0.7)
    torch.testing.assert_close(targets.sum(-1), torch.ones(m, b), atol=1e-6, rtol=0)
    own_share = targets.gather(-1, own[..., None])[..., 0]
    partner_share = targets.sum(-1) - own_share
    assert (own_share >= 0.5 - 1e-6).all()
    if method == "cutmix":  # independent: count the own image's pixels inside the kept region
        is_own = (mixed[:, :, 0] == images[own][:, :, 0]).float()
        kept = masks.transpose(0, 1)
        area = kept.sum((-2, -1))
        ref = torch.where(area > 0, (is_own * kept).sum((-2, -1)) / area.clamp_min(1e-12), is_own.mean((-2, -1)))
        # when own and partner are the same image, the pixel test cannot tell; skip those
        differs = partner_share > 0
        torch.testing.assert_close(own_share[differs], ref[differs], atol=1e-6, rtol=0)


def test_msda_on_pooled_feature_masks():
    images, labels = torch.randn(4, 3, 16, 16), torch.arange(4)
    own = repetition_indices(4, 2, 1)
    masks, _ = mixmo_masks(sample_ratios(4, 2, 2.0), (8, 8), "cutmix")  # features at half resolution (Tiny)
    mixed, targets = msda(images, own, labels, masks, 4, "cutmix", prob=1.0)
    assert mixed.shape == (2, 4, 3, 16, 16)
    torch.testing.assert_close(targets.sum(-1), torch.ones(2, 4), atol=1e-6, rtol=0)


def test_temperature_scaling_lowers_nll_of_overconfident_model():
    torch.manual_seed(0)
    n, c = 2000, 5
    true_logits = torch.randn(n, c) * 1.5
    labels = torch.distributions.Categorical(logits=true_logits).sample()
    overconfident = 4.0 * true_logits
    t = fit_temperature(overconfident, labels)
    before = F.cross_entropy(overconfident, labels)
    after = F.cross_entropy(overconfident / t, labels)
    assert after < before - 0.1
    grid = torch.linspace(3.0, 5.0, 81)
    best = grid[torch.stack([F.cross_entropy(overconfident / g, labels) for g in grid]).argmin()]
    assert t == pytest.approx(best.item(), abs=0.03)
    assert 3.5 < t < 4.5
    # an already calibrated model keeps T close to 1, never worse NLL
    t_cal = fit_temperature(true_logits, labels)
    assert F.cross_entropy(true_logits / t_cal, labels) <= F.cross_entropy(true_logits, labels) + 1e-6


def test_cross_fit_splits_in_halves():
    logits, labels = torch.randn(101, 3) * 3, torch.randint(0, 3, (101,))
    (idx_b, t_a), (idx_a, t_b) = cross_fit_temperature(logits, labels)
    assert sorted(torch.cat([idx_a, idx_b]).tolist()) == list(range(101))
    assert t_a > 0 and t_b > 0


def test_ratio_errors_against_direct_count():
    member_logits, labels = torch.randn(3, 200, 4), torch.randint(0, 4, (200,))
    metric = RatioErrors(3)
    metric.update(member_logits[:, :120], labels[:120])
    metric.update(member_logits[:, 120:], labels[120:])
    wrong = (member_logits.argmax(-1) != labels).numpy()
    ratios = []
    for i in range(3):
        for j in range(i + 1, 3):
            n01_n10 = np.sum(wrong[i] != wrong[j])
            n00 = np.sum(wrong[i] & wrong[j])
            ratios.append(n01_n10 / max(n00, 1))
    assert metric.compute().item() == pytest.approx(np.mean(ratios), rel=1e-6)


# -- given centres, generators, vectors -----------------------------------------------------
def test_given_centre_reproduces_hand_computed_boxes():
    lam = torch.tensor([0.25, 0.25, 0.0])  # side 2 * floor(floor(32 * 0.5) / 2) = 16; lam 0: empty
    masks = cutmix_box_masks(lam, 32, 32, centre=torch.tensor([[10, 20], [3, 30], [16, 16]]))
    expected = np.zeros((3, 32, 32), dtype=np.float32)
    expected[0, 2:18, 12:28] = 1  # rows 10 -+ 8, columns 20 -+ 8
    expected[1, 0:11, 22:32] = 1  # clipped at the top and right borders
    np.testing.assert_array_equal(masks.numpy(), expected)
    # 1-D block: length 2 * floor(floor(20 * 0.3) / 2) = 6
    blocks = cutmix_block_masks(torch.full((3,), 0.3), 20, centre=torch.tensor([[5], [1], [19]]))
    expected = np.zeros((3, 20), dtype=np.float32)
    expected[0, 2:8], expected[1, 0:4], expected[2, 16:20] = 1, 1, 1
    np.testing.assert_array_equal(blocks.numpy(), expected)


def test_generator_draws_the_documented_centres():
    lam = torch.rand(64)
    g = torch.Generator().manual_seed(7)
    cx, cy = torch.randint(0, 12, (64,), generator=g), torch.randint(0, 10, (64,), generator=g)  # x first
    by_centre = cutmix_box_masks(lam, 10, 12, centre=torch.stack([cy, cx], -1))
    torch.testing.assert_close(cutmix_box_masks(lam, 10, 12, generator=torch.Generator().manual_seed(7)), by_centre)


def test_block_masks_are_contiguous_with_mean_at_most_lambda():
    lam = torch.rand(500)
    blocks = cutmix_block_masks(lam, 24).numpy()
    for row, l in zip(blocks, lam.tolist()):
        on = np.nonzero(row)[0]
        length = 2 * math.floor(math.floor(24 * l) / 2)
        assert row.mean() <= l + 1e-7 and len(on) <= length
        if len(on):
            assert on.max() - on.min() + 1 == len(on)  # one contiguous block
            if 0 < on.min() and on.max() < 23:
                assert len(on) == length  # not clipped: the full length
    assert cutmix_block_masks(torch.full((20,), 0.99 * 2 / 24), 24).sum() == 0  # empty below 2 features


def test_generators_reproduce_every_draw():
    def draws(seed):
        g = torch.Generator().manual_seed(seed)
        lam = sample_ratios(32, 3, 2.0, generator=g)
        masks, _ = mixmo_masks(lam, (8, 8), "cutmix", role_permutation(3, g), generator=g)
        own = repetition_indices(16, 3, 2, 0.25, generator=g)
        images = torch.randn(16, 1, 8, 8, generator=g)
        mixed, targets = msda(images, own, torch.arange(16), masks, 16, "cutmix", 0.5, generator=g)
        return lam, masks, own, mixed, targets, mixing_method(0.5, g)

    first, again, other = draws(3), draws(3), draws(4)
    for a, b, c in zip(first[:-1], again[:-1], other[:-1]):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
        assert not torch.equal(a, c)
    assert first[-1] == again[-1]


@pytest.mark.parametrize("alpha", [0.5, 2.0])
def test_generator_dirichlet_matches_beta_distribution(alpha):
    """The generator path samples Gamma itself (Marsaglia-Tsang); KS test against scipy's Beta."""
    from scipy import stats

    lam = sample_ratios(20000, 2, alpha, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    torch.testing.assert_close(lam.sum(1), torch.ones(20000, dtype=torch.float64))
    assert stats.kstest(lam[:, 0].numpy(), stats.beta(alpha, alpha).cdf).pvalue > 1e-3
    three = sample_ratios(20000, 3, alpha, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    assert stats.kstest(three[:, 2].numpy(), stats.beta(alpha, 2 * alpha).cdf).pvalue > 1e-3  # Dirichlet marginal


@pytest.mark.parametrize("members", [2, 3])
@pytest.mark.parametrize("method", ["cutmix", "mixup"])
def test_vector_masks_sum_to_one_and_mix_per_feature(members, method):
    lam = sample_ratios(32, members, 2.0)
    masks, lam_out = mixmo_masks(lam, (20,), method)
    assert masks.shape == ((32, members, 20) if method == "cutmix" else (32, members, 1))
    full = masks.expand(32, members, 20)
    torch.testing.assert_close(full.sum(1), torch.ones(32, 20), atol=1e-6, rtol=0)
    torch.testing.assert_close(lam_out, full.mean(-1), atol=1e-6, rtol=0)
    if method == "cutmix":  # member 0 (no role shuffle) holds the block, mean <= the drawn lam
        assert (lam_out[:, 0] <= lam[:, 0] + 1e-7).all()
        assert set(masks[:, 0].unique().tolist()) <= {0.0, 1.0}
    f = torch.randn(members, 32, 20)
    ref = sum(members * full[:, k] * f[k] for k in range(members))
    torch.testing.assert_close(mix_features(f, masks), ref)


def test_msda_on_vector_features_uses_the_whole_image():
    n, b = 6, 12
    images = (torch.arange(n, dtype=torch.float32) + 1)[:, None, None, None].expand(n, 1, 8, 8).contiguous()
    own = repetition_indices(n, 2, 2)
    masks, _ = mixmo_masks(sample_ratios(b, 2, 2.0), (10,), "cutmix")
    mixed, targets = msda(images, own, torch.arange(n), masks, n, "cutmix", prob=1.0)
    own_share = targets.gather(-1, own[..., None])[..., 0]
    is_own = (mixed[:, :, 0] == images[own][:, :, 0]).float().mean((-2, -1))
    differs = targets.sum(-1) - own_share > 0
    torch.testing.assert_close(own_share[differs], is_own[differs], atol=1e-6, rtol=0)
    torch.testing.assert_close(targets.sum(-1), torch.ones(2, b), atol=1e-6, rtol=0)

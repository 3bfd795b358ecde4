"""MixMo mixing blocks: ratios, masks, batch repetition, MSDA labels and the soft-target loss.

Ramé, Sun & Cord, "MixMo: Mixing Multiple Inputs for Multiple Outputs via Deep Subnetworks",
ICCV 2021 (arXiv 2103.06132); formulas restate the official ``alexrame/mixmo-pytorch`` code as
summarised in ``specs/superposition_mixmo_subspaces.md`` §2.2-2.3. Everything here is a pure
function on tensors: it runs on the device of its inputs, vectorised over the batch (no Python
loop over samples). Randomness uses the global torch generators (seeded by ``seed_everything``)
unless a ``torch.Generator`` is given (on the device of the draws), so a run's masks and ratios can
be reproduced outside a full seed; the box functions also take a given centre. The per-batch coin
flips (CutMix or mixup, role shuffle) are drawn on the CPU so that no device synchronisation is needed.

Shapes: ``B`` samples per step, ``M`` members, ratios ``lam`` ``(B, M)``, masks at the resolution
of the stem outputs: ``(B, M, h, w)`` for feature maps (B, C, h, w) and ``(B, M, C)`` for feature
vectors (B, C) (MLP-like stems); mixup masks are constant and returned as ``(B, M, 1, 1)`` /
``(B, M, 1)``, which broadcast.

**CutMix on vectors** (no counterpart in the paper, whose stems output maps): the box becomes a
contiguous block of features, the 1-D case of the same rule. The 2-D box has side
``2 * floor(floor(W * sqrt(lam)) / 2)`` per axis, i.e. ``lam^(1/d)`` of each side for d = 2 axes;
for d = 1 the block has length ``L = 2 * floor(floor(C * lam) / 2)``, centred on a uniform position
``c`` in ``0..C-1`` and clipped to ``[max(c - L/2, 0), min(c + L/2, C))``. As in 2-D,
``L <= C * lam`` so ``mean(mask) <= lam``, and the block is empty when ``lam < 2 / C``.
"""

from __future__ import annotations

import math
from typing import Literal, Sequence

import torch
import torch.nn.functional as F

RATIO_EPOCH_DECREASE = 11.0 / 12.0
"""Training progress after which the CutMix probability decays linearly to 0 (spec §2.2)."""

Generator = torch.Generator | None


def _gamma(shape: float, size: tuple[int, ...], generator: torch.Generator, device, dtype) -> torch.Tensor:
    """Gamma(shape, 1) draws from ``generator`` (Marsaglia & Tsang 2000, ACM TOMS 26(3); shape < 1 via
    ``Gamma(a) = Gamma(a + 1) * U^(1/a)``). Used only when a generator is given: torch's own Gamma
    sampler takes none."""
    a = float(shape)
    d = (a + 1.0 if a < 1 else a) - 1.0 / 3.0
    c = 1.0 / math.sqrt(9.0 * d)
    n = math.prod(size)
    out = torch.empty(n, device=device, dtype=dtype)
    pending = torch.arange(n, device=device)
    while pending.numel():  # acceptance >= 95 %: a few rounds
        x = torch.randn(pending.numel(), generator=generator, device=device, dtype=dtype)
        u = torch.rand(pending.numel(), generator=generator, device=device, dtype=dtype)
        v = (1 + c * x) ** 3
        ok = (v > 0) & (u.log() < 0.5 * x * x + d - d * v + d * v.clamp_min(torch.finfo(dtype).tiny).log())
        out[pending[ok]] = d * v[ok]
        pending = pending[~ok]
    if a < 1:
        out = out * torch.rand(n, generator=generator, device=device, dtype=dtype) ** (1.0 / a)
    return out.view(size)


def _dirichlet(alpha: float, members: int, batch: tuple[int, ...], device, dtype, generator: Generator) -> torch.Tensor:
    """Dirichlet(alpha * 1_M) draws of shape (*batch, M)."""
    if generator is None:
        concentration = torch.full((members,), float(alpha), device=device, dtype=dtype)
        return torch.distributions.Dirichlet(concentration, validate_args=False).sample(batch)  # no device sync
    g = _gamma(alpha, (*batch, members), generator, device, dtype)
    return g / g.sum(-1, keepdim=True)


def sample_ratios(
    batch: int,
    members: int,
    alpha: float,
    device: torch.device | str | None = None,
    *,
    dtype: torch.dtype | None = None,
    generator: Generator = None,
) -> torch.Tensor:
    """Per-sample mixing ratios ``lam ~ Dirichlet(alpha * 1_M)``, shape (B, M); ``alpha <= 0`` gives 1/M.

    With M = 2 this is Beta(alpha, alpha) for member 0 (spec §2.2, MixMo Eq. 3 with alpha = 2).
    ``dtype`` defaults to torch's default float type.
    """
    if members < 1:
        raise ValueError(f"members={members}; expected >= 1")
    dtype = dtype or torch.get_default_dtype()
    if alpha <= 0 or members == 1:
        return torch.full((batch, members), 1.0 / members, device=device, dtype=dtype)
    return _dirichlet(alpha, members, (batch,), device, dtype, generator)


def _cutmix_masks(
    lam: torch.Tensor, shape: Sequence[int], centre: torch.Tensor | None, generator: Generator
) -> torch.Tensor:
    """Binary boxes (B, *shape) for d = len(shape) in {1, 2} axes: side ``2 * floor(floor(n * lam^(1/d)) / 2)``
    on an axis of size n, centred on ``centre`` (B, d) (default uniform) and clipped at the border."""
    b, d = lam.shape[0], len(shape)
    if d not in (1, 2):
        raise ValueError(f"CutMix masks for feature shape {tuple(shape)}; expected (h, w) maps or (C,) vectors")
    root = lam.clamp(0, 1).sqrt() if d == 2 else lam.clamp(0, 1)
    if centre is None:  # drawn last axis first (x before y), the order of the official box
        draws = [torch.randint(0, n, (b,), device=lam.device, generator=generator) for n in reversed(shape)]
        centre = torch.stack(draws[::-1], dim=-1)
    centre = torch.as_tensor(centre, device=lam.device).expand(b, d)
    inside = torch.ones((b,) + (1,) * d, dtype=torch.bool, device=lam.device)
    for axis, n in enumerate(shape):
        half = torch.floor(torch.floor(n * root) / 2)
        lo, hi = (centre[:, axis] - half).clamp(0, n), (centre[:, axis] + half).clamp(0, n)
        pos = torch.arange(n, device=lam.device)
        view = [b] + [n if i == axis else 1 for i in range(d)]
        inside = inside & ((pos >= lo[:, None]) & (pos < hi[:, None])).view(view)
    return inside.to(lam.dtype)


def cutmix_box_masks(
    lam: torch.Tensor, height: int, width: int, *, centre: torch.Tensor | None = None, generator: Generator = None
) -> torch.Tensor:
    """Binary CutMix boxes (B, H, W) of area about ``lam`` (B,), one per sample (spec §2.2).

    Side ``2 * floor(floor(W * sqrt(lam)) / 2)`` (likewise for H), centred on a uniform pixel (or on
    ``centre``, int (B, 2) or (2,) as (row, column)) and clipped at the border, so ``mean(mask) <= lam``;
    the box is empty when ``lam < (2 / W)^2``.
    """
    return _cutmix_masks(lam, (height, width), centre, generator)


def cutmix_block_masks(
    lam: torch.Tensor, length: int, *, centre: torch.Tensor | None = None, generator: Generator = None
) -> torch.Tensor:
    """Binary CutMix blocks (B, C) for feature vectors: the 1-D box (module doc, "CutMix on vectors").

    Length ``L = 2 * floor(floor(C * lam) / 2)``, centred on a uniform position (or ``centre``, int
    (B, 1) or (1,)) and clipped to ``[0, C)``, so ``mean(mask) <= lam``; empty when ``lam < 2 / C``.
    """
    return _cutmix_masks(lam, (length,), centre, generator)


def patch_probability(p: float, progress: float) -> float:
    """CutMix probability at training progress ``t = epoch / max_epochs`` (spec §2.2).

    ``p`` while ``t < 11/12``, then ``p * (1 - t) * 12``: a linear decay that reaches 0 at the end.
    """
    if progress < RATIO_EPOCH_DECREASE:
        return p
    return max(0.0, p * (1.0 - progress) * 12.0)


def mixing_method(cutmix_prob: float, generator: Generator = None) -> Literal["cutmix", "mixup"]:
    """The batch's mask kind: ``cutmix`` with probability ``cutmix_prob``, else ``mixup`` (spec §2.2)."""
    return "cutmix" if float(torch.rand((), generator=generator)) < cutmix_prob else "mixup"


def role_permutation(members: int, generator: Generator = None) -> list[int]:
    """The role shuffle: one random permutation of the members for the whole batch (spec §2.2)."""
    return torch.randperm(members, generator=generator).tolist()


def mixmo_masks(
    lam: torch.Tensor,
    shape: Sequence[int],
    method: Literal["cutmix", "mixup"],
    role_perm: list[int] | torch.Tensor | None = None,
    *,
    generator: Generator = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Masks (B, M, *shape) with ``sum_k m_k = 1`` and the ratios reset to the mask means (spec §2.2).

    ``shape`` is the stem output without batch and channels: ``(h, w)`` for maps, ``(C,)`` for vectors.

    * ``mixup``: ``m_k = lam_k`` (constant, returned as (B, M, 1, 1) or (B, M, 1)).
    * ``cutmix``: member 0 gets a CutMix box (maps) or block (vectors) of area ``lam_0`` and ``lam_0``
      is reset to its mean; for M = 2 member 1 gets the complement; for M > 2 the complement is
      shared linearly by the others in proportion to their ratios: CutMix(A, Mixup(B, C, ...)).
    * ``role_perm``: one permutation of the members for the whole batch (the official role shuffle,
      :func:`role_permutation`), so each member gets either the box or its complement; ``None`` keeps the order.

    Returns ``(masks, lam)`` with ``lam[:, k] = mean(masks[:, k])``.
    """
    b, m = lam.shape
    ones = (1,) * len(shape)
    if method == "mixup" or m == 1:
        masks = lam.reshape(b, m, *ones).clone()
        if m == 1:
            masks = torch.ones_like(masks)
            lam = torch.ones_like(lam)
    elif method == "cutmix":
        box = _cutmix_masks(lam[:, 0], shape, None, generator)  # (B, *shape)
        rest = lam[:, 1:] / lam[:, 1:].sum(1, keepdim=True).clamp_min(torch.finfo(lam.dtype).tiny)
        masks = torch.cat([box[:, None], (1 - box)[:, None] * rest.reshape(b, m - 1, *ones)], dim=1)
        lam = masks.flatten(2).mean(-1)
    else:
        raise ValueError(f"method={method!r}; expected 'cutmix' or 'mixup'")
    if role_perm is not None:
        perm = torch.as_tensor(role_perm, device=lam.device)
        masks, lam = masks[:, perm], lam[:, perm]
    return masks, lam


def member_weights(lam: torch.Tensor, root: float) -> torch.Tensor:
    """Loss weights ``w_k = M * lam_k^(1/r) / sum_j lam_j^(1/r)`` (spec §2.2, MixMo Eq. 5); ``sum_k w_k = M``."""
    if root <= 0:
        raise ValueError(f"weight_root={root}; expected > 0 (3 in MixMo, 1 for MIMO)")
    powered = lam.clamp_min(0).pow(1.0 / root)
    return lam.shape[1] * powered / powered.sum(1, keepdim=True).clamp_min(torch.finfo(lam.dtype).tiny)


def mix_features(features: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """MixMo mixing block ``h = M * sum_k m_k * f_k`` (spec §2.1).

    ``features`` (M, B, C, h, w) with masks (B, M, h', w') (h', w' equal to h, w or 1, broadcast over
    channels), or vectors (M, B, C) with masks (B, M, C') (C' equal to C or 1). Mixup masks of 1/M
    give ``sum_k f_k`` (MIMO, Havasi et al. 2021).
    """
    members = features.shape[0]
    weights = masks.transpose(0, 1).to(features.dtype)  # (M, B, h, w) or (M, B, C)
    if features.dim() == 5:
        weights = weights.unsqueeze(2)  # (M, B, 1, h, w)
    return members * (weights * features).sum(0)


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of ``sum_c -t_c * log softmax(z)_c`` (spec §2.2); targets need not sum to 1.

    Computed in the logits' precision, half and bfloat16 promoted to float32 (float64 stays float64).
    """
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    return -(targets * F.log_softmax(logits, dim=-1)).sum(-1).mean()


def repetition_indices(
    n: int,
    members: int,
    repetitions: int,
    proba_input_repetition: float = 0.0,
    device: torch.device | str | None = None,
    *,
    generator: Generator = None,
) -> torch.Tensor:
    """Indices (M, n * b) into a batch of ``n`` unique samples: the batch repetition sampler (spec §2.3).

    Every index appears exactly ``b`` times per member; member 0 gets a random order and each other
    member its own permutation of it, except the first ``floor(rho * n * b)`` positions, which are
    shared by all members (identical inputs, ``proba_input_repetition`` = rho).
    """
    if repetitions < 1:
        raise ValueError(f"batch_repetitions={repetitions}; expected >= 1")
    if not 0.0 <= proba_input_repetition <= 1.0:
        raise ValueError(f"proba_input_repetition={proba_input_repetition}; expected a probability in [0, 1]")
    size = n * repetitions
    base = torch.arange(n, device=device).repeat(repetitions)
    base = base[torch.randperm(size, device=device, generator=generator)]
    fixed = int(math.floor(proba_input_repetition * size))
    if members == 1:
        return base[None]
    # One independent permutation of the free positions per further member, drawn in one call.
    keys = torch.rand(members - 1, size - fixed, device=device, generator=generator)
    perms = keys.argsort(dim=1) + fixed
    others = torch.cat([base[:fixed].expand(members - 1, fixed), base[perms]], dim=1)
    return torch.cat([base[None], others], dim=0)


def msda(
    images: torch.Tensor,
    own: torch.Tensor,
    labels: torch.Tensor,
    masks: torch.Tensor,
    num_classes: int,
    method: Literal["cutmix", "mixup"],
    prob: float = 0.5,
    beta: float = 1.0,
    *,
    generator: Generator = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixed-sample data augmentation on top of MixMo, per member and sample (spec §2.2, ``call_msda``).

    Args:
        images: the unique images of the step (n, C, H, W).
        own: indices (M, B) of each member's own images (from :func:`repetition_indices`).
        labels: int64 labels (n,) of ``images``.
        masks: MixMo masks (B, M, h, w) at the feature resolution (h, w may be 1), or (B, M, C) for
            feature vectors.
        method, prob, beta: with probability ``prob`` a random partner j of the batch is mixed in
            with a pixel-level CutMix box or mixup ratio, ``lam' ~ Beta(beta, beta)``.

    ``lam'`` is reset to the own-image share inside the region the MixMo mask keeps,
    ``mean(s * m_k) / mean(m_k)`` with ``s`` average-pooled to the feature resolution; if it is below
    0.5 the two images swap roles so that the member's own index keeps at least half. On feature
    vectors no pixel region corresponds to a block of features, so ``lam'`` is the own-image share of
    the whole image. Returns the mixed inputs (M, B, C, H, W) and soft targets (M, B, num_classes)
    that sum to 1.
    """
    m, b = own.shape
    _, c, height, width = images.shape
    device = images.device
    partner = torch.randint(0, images.shape[0], (m, b), device=device, generator=generator)
    apply = torch.rand(m, b, device=device, generator=generator) < prob
    dtype = torch.promote_types(images.dtype, torch.float32)
    lam = _dirichlet(beta, 2, (m, b), device, dtype, generator)[..., 0]  # Beta(beta, beta)
    lam = torch.where(apply, lam, torch.ones_like(lam))
    if method == "cutmix":
        # the partner is pasted into a box of area 1 - lam; s marks the member's own pixels
        box = _cutmix_masks((1 - lam).flatten(), (height, width), None, generator)
        s = 1 - box.view(m, b, 1, height, width)
        s = torch.where(apply[:, :, None, None, None], s, torch.ones_like(s))
    elif method == "mixup":
        s = lam[:, :, None, None, None]
    else:
        raise ValueError(f"msda method={method!r}; expected 'cutmix' or 'mixup'")
    if masks.dim() == 3:  # feature vectors: the whole image is kept
        kept, s_feat = torch.ones(m, b, 1, 1, 1, dtype=s.dtype, device=device), s
    else:
        member_masks = masks.transpose(0, 1)  # (M, B, h, w)
        fh, fw = member_masks.shape[-2:]
        if s.shape[-1] > 1 and (fh, fw) != (height, width) and fh > 1:
            s_feat = F.adaptive_avg_pool2d(s.flatten(0, 1), (fh, fw)).view(m, b, 1, fh, fw)
        else:
            s_feat = s
        kept = member_masks.unsqueeze(2)  # (M, B, 1, h, w), broadcasts against s_feat
    area = kept.mean((-3, -2, -1))
    share = (s_feat * kept).mean((-3, -2, -1)) / area.clamp_min(1e-12)
    own_area = s_feat.mean((-3, -2, -1))
    lam = torch.where(area > 1e-12, share, own_area)
    swap = lam < 0.5
    s = torch.where(swap[:, :, None, None, None], 1 - s, s)
    lam = torch.where(swap, 1 - lam, lam)
    mixed = (s * images[own] + (1 - s) * images[partner]).to(images.dtype)
    targets = lam[..., None] * F.one_hot(labels[own], num_classes).to(lam.dtype) + (1 - lam)[
        ..., None
    ] * F.one_hot(labels[partner], num_classes).to(lam.dtype)
    return mixed, targets

"""MixMo mixing blocks: ratios, masks, batch repetition, MSDA labels and the soft-target loss.

Ramé, Sun & Cord, "MixMo: Mixing Multiple Inputs for Multiple Outputs via Deep Subnetworks",
ICCV 2021 (arXiv 2103.06132); formulas restate the official ``alexrame/mixmo-pytorch`` code as
summarised in ``specs/superposition_mixmo_subspaces.md`` §2.2-2.3. Everything here is a pure
function on tensors: it runs on the device of its inputs, vectorised over the batch (no Python
loop over samples). Randomness uses the global torch generators (seeded by ``seed_everything``);
the per-batch coin flips (CutMix or mixup, role shuffle) are drawn on the CPU so that no device
synchronisation is needed.

Shapes: ``B`` samples per step, ``M`` members, masks ``(B, M, h, w)`` at the resolution of the
stem outputs (``h = w = 1`` for mixup masks, which broadcast), ratios ``lam`` ``(B, M)``.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F

RATIO_EPOCH_DECREASE = 11.0 / 12.0
"""Training progress after which the CutMix probability decays linearly to 0 (spec §2.2)."""


def sample_ratios(batch: int, members: int, alpha: float, device: torch.device | str | None = None) -> torch.Tensor:
    """Per-sample mixing ratios ``lam ~ Dirichlet(alpha * 1_M)``, shape (B, M); ``alpha <= 0`` gives 1/M.

    With M = 2 this is Beta(alpha, alpha) for member 0 (spec §2.2, MixMo Eq. 3 with alpha = 2).
    """
    if members < 1:
        raise ValueError(f"members={members}; expected >= 1")
    if alpha <= 0 or members == 1:
        return torch.full((batch, members), 1.0 / members, device=device)
    concentration = torch.full((members,), float(alpha), device=device)
    return torch.distributions.Dirichlet(concentration, validate_args=False).sample((batch,))  # no device sync


def cutmix_box_masks(lam: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Binary CutMix boxes (B, H, W) of area about ``lam`` (B,), one per sample (spec §2.2).

    Side ``2 * floor(floor(W * sqrt(lam)) / 2)`` (likewise for H), centred on a uniform pixel and
    clipped at the border, so ``mean(mask) <= lam``; the box is empty when ``lam < (2 / W)^2``.
    """
    root = lam.clamp(0, 1).sqrt()
    half_w = torch.floor(torch.floor(width * root) / 2)
    half_h = torch.floor(torch.floor(height * root) / 2)
    cx = torch.randint(0, width, lam.shape, device=lam.device)
    cy = torch.randint(0, height, lam.shape, device=lam.device)
    x1, x2 = (cx - half_w).clamp(0, width), (cx + half_w).clamp(0, width)
    y1, y2 = (cy - half_h).clamp(0, height), (cy + half_h).clamp(0, height)
    xs = torch.arange(width, device=lam.device)
    ys = torch.arange(height, device=lam.device)
    in_x = (xs >= x1[:, None]) & (xs < x2[:, None])  # (B, W)
    in_y = (ys >= y1[:, None]) & (ys < y2[:, None])  # (B, H)
    return (in_y[:, :, None] & in_x[:, None, :]).to(lam.dtype)


def patch_probability(p: float, progress: float) -> float:
    """CutMix probability at training progress ``t = epoch / max_epochs`` (spec §2.2).

    ``p`` while ``t < 11/12``, then ``p * (1 - t) * 12``: a linear decay that reaches 0 at the end.
    """
    if progress < RATIO_EPOCH_DECREASE:
        return p
    return max(0.0, p * (1.0 - progress) * 12.0)


def mixmo_masks(
    lam: torch.Tensor,
    height: int,
    width: int,
    method: Literal["cutmix", "mixup"],
    role_perm: list[int] | torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Masks (B, M, h, w) with ``sum_k m_k = 1`` and the ratios reset to the mask means (spec §2.2).

    * ``mixup``: ``m_k = lam_k`` (constant, returned as (B, M, 1, 1)).
    * ``cutmix``: member 0 gets a CutMix box of area ``lam_0`` and ``lam_0`` is reset to the box's mean;
      for M = 2 member 1 gets the complement; for M > 2 the complement is shared linearly by the
      others in proportion to their ratios: CutMix(A, Mixup(B, C, ...)).
    * ``role_perm``: one permutation of the members for the whole batch (the official role shuffle),
      so each member gets either the box or its complement; ``None`` keeps the order.

    Returns ``(masks, lam)`` with ``lam[:, k] = mean(masks[:, k])``.
    """
    b, m = lam.shape
    if method == "mixup" or m == 1:
        masks = lam[:, :, None, None].clone()
        if m == 1:
            masks = torch.ones_like(masks)
            lam = torch.ones_like(lam)
    elif method == "cutmix":
        box = cutmix_box_masks(lam[:, 0], height, width)  # (B, H, W)
        rest = lam[:, 1:] / lam[:, 1:].sum(1, keepdim=True).clamp_min(torch.finfo(lam.dtype).tiny)
        masks = torch.cat([box[:, None], (1 - box)[:, None] * rest[:, :, None, None]], dim=1)
        lam = masks.mean((-2, -1))
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

    ``features`` (M, B, C, h, w); ``masks`` (B, M, h', w') with h', w' equal to h, w or 1
    (broadcast over channels). Mixup masks of 1/M give ``sum_k f_k`` (MIMO, Havasi et al. 2021).
    """
    members = features.shape[0]
    weights = masks.transpose(0, 1).unsqueeze(2).to(features.dtype)  # (M, B, 1, h, w)
    return members * (weights * features).sum(0)


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of ``sum_c -t_c * log softmax(z)_c`` (spec §2.2); targets need not sum to 1."""
    return -(targets * F.log_softmax(logits.float(), dim=-1)).sum(-1).mean()


def repetition_indices(
    n: int,
    members: int,
    repetitions: int,
    proba_input_repetition: float = 0.0,
    device: torch.device | str | None = None,
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
    base = base[torch.randperm(size, device=device)]
    fixed = int(math.floor(proba_input_repetition * size))
    if members == 1:
        return base[None]
    # One independent permutation of the free positions per further member, drawn in one call.
    keys = torch.rand(members - 1, size - fixed, device=device)
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
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixed-sample data augmentation on top of MixMo, per member and sample (spec §2.2, ``call_msda``).

    Args:
        images: the unique images of the step (n, C, H, W).
        own: indices (M, B) of each member's own images (from :func:`repetition_indices`).
        labels: int64 labels (n,) of ``images``.
        masks: MixMo masks (B, M, h, w) at the feature resolution (h, w may be 1).
        method, prob, beta: with probability ``prob`` a random partner j of the batch is mixed in
            with a pixel-level CutMix box or mixup ratio, ``lam' ~ Beta(beta, beta)``.

    ``lam'`` is reset to the own-image share inside the region the MixMo mask keeps,
    ``mean(s * m_k) / mean(m_k)`` with ``s`` average-pooled to the feature resolution; if it is below
    0.5 the two images swap roles so that the member's own index keeps at least half. Returns the
    mixed inputs (M, B, C, H, W) and soft targets (M, B, num_classes) that sum to 1.
    """
    m, b = own.shape
    _, c, height, width = images.shape
    device = images.device
    partner = torch.randint(0, images.shape[0], (m, b), device=device)
    apply = torch.rand(m, b, device=device) < prob
    concentration = torch.tensor(float(beta), device=device)
    lam = torch.distributions.Beta(concentration, concentration, validate_args=False).sample((m, b))
    lam = torch.where(apply, lam, torch.ones_like(lam))
    if method == "cutmix":
        # the partner is pasted into a box of area 1 - lam; s marks the member's own pixels
        s = 1 - cutmix_box_masks((1 - lam).flatten(), height, width).view(m, b, 1, height, width)
        s = torch.where(apply[:, :, None, None, None], s, torch.ones_like(s))
    elif method == "mixup":
        s = lam[:, :, None, None, None]
    else:
        raise ValueError(f"msda method={method!r}; expected 'cutmix' or 'mixup'")
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
    mixed = s * images[own] + (1 - s) * images[partner]
    targets = lam[..., None] * F.one_hot(labels[own], num_classes).to(lam.dtype) + (1 - lam)[
        ..., None
    ] * F.one_hot(labels[partner], num_classes).to(lam.dtype)
    return mixed, targets

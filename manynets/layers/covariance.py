"""Streaming float64 covariance of layer outputs, intrinsic dimension and saturation.

Spec pinet_saturation part 2 (delve / PHD-LAB, Richter, Shenk et al.; official
``delve-team/delve`` ``delve/torch_utils.py`` and ``delve/metrics.py``):

- §2.1 per tracked layer a running ``S = sum a a^T``, ``s = sum a`` and ``n`` in float64; at read
  time ``Q = S / n - mu mu^T`` with ``mu = s / n`` (biased, centred). A conv output (B, C, H, W) is
  treated **channel-wise**: every spatial position is a sample, i.e. the covariance of the
  (B*H*W, C) reshape; optionally the map is first resized to ``d x d`` (nearest) when H or W > d.
  Under DDP the three sums are all-reduced before the eigen-decomposition, so every rank sees the
  covariance of the whole epoch's data.
- §2.2 with eigenvalues ``lambda`` of Q (descending, negatives set to 0) and cumulative shares
  ``p_k = sum_{i<=k} lambda_i / sum lambda``, the **intrinsic dimension** is delve's
  ``ID = #{k : p_k < delta}`` (= min{k : p_k >= delta} - 1); rank-1 or all-zero outputs give 0;
  ``delta > 1`` gives ``ID = D``. **saturation = ID / D** with D the layer width.
  ``count="textbook"`` gives ``min{k : p_k >= delta}`` instead (clearly not the published rule),
  ``count="pca_layer"`` PHD-LAB's PCA-layer count (§2.8: delve's count, at least 1, plus one more
  when ``delta - p_k > 0.02``).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F

Count = Literal["delve", "textbook", "pca_layer"]
ConvMethod = Literal["channelwise", "mean", "flatten"]


def layer_samples(
    output: torch.Tensor, conv_method: ConvMethod = "channelwise", downsampling: int | None = None
) -> torch.Tensor:
    """Turn a layer output into a (N, D) sample matrix (spec §2.1).

    (B, D) stays as is. (B, C, H, W): ``channelwise`` -> (B*H*W, C) (every position a sample),
    ``mean`` -> (B, C) global average, ``flatten`` -> (B, C*H*W). With ``downsampling = d`` a map
    with H or W > d is first resized to d x d by nearest interpolation (delve's
    ``interpolation_strategy='nearest'``). Other ranks: (B, ..., D) -> (B*..., D).
    """
    if output.dim() == 4:
        output = resized_map(output, downsampling)
        if conv_method == "channelwise":
            return output.permute(0, 2, 3, 1).reshape(-1, output.shape[1])
        if conv_method == "mean":
            return output.mean((2, 3))
        if conv_method == "flatten":
            return output.flatten(1)
        raise ValueError(f"conv_method={conv_method!r}; expected 'channelwise', 'mean' or 'flatten'")
    if output.dim() < 2:
        raise ValueError(f"layer output of shape {tuple(output.shape)}; expected (B, D) or (B, C, H, W)")
    return output.reshape(-1, output.shape[-1])


def resized_map(output: torch.Tensor, downsampling: int | None) -> torch.Tensor:
    """A (B, C, H, W) map resized to d x d (nearest) when H or W > d (``downsampling = d``), else as is."""
    if downsampling is not None and (output.shape[-1] > downsampling or output.shape[-2] > downsampling):
        return F.interpolate(output, size=(downsampling, downsampling), mode="nearest")
    return output


class StreamingCovariance:
    """Running ``S = sum a a^T``, ``s = sum a``, ``n`` of (N, D) samples in float64 (spec §2.1).

    One ``addmm`` per update, on the samples' device, with no host synchronisation (``n`` is a
    Python int taken from the shape).

    ``matmul_dtype=torch.float32`` (about 2x faster on CPUs and on GPUs without fast float64) multiplies
    the samples minus a shift m (the first batch's mean, then the running mean at every fold) in float32:
    over a window of k samples, ``W = sum (a - m)(a - m)^T`` and ``R = sum (a - m)`` accumulate in float32,
    and every ``FOLD_EVERY`` batches (and when read) they move into the float64 sums exactly,
    ``S += W + k m m^T + m R^T + R m^T`` and ``s += k m + R``. The float32 products never carry the
    large mean, so there is no cancellation; W is symmetric, so for D >= 64 only its two diagonal blocks
    and one off-diagonal block are multiplied (3/4 of the products).

    :meth:`update_maps` takes a conv output (B, C, H, W) channel-wise (every position a sample) and
    writes the (C, B·H·W) matrix of the GEMM in one pass (shifted, in float32 mode), instead of first
    copying the (B·H·W, C) permutation.
    """

    FOLD_EVERY = 64

    def __init__(self, dim: int, device: torch.device | str | None = None, matmul_dtype: torch.dtype = torch.float64):
        self.dim = dim
        self.matmul_dtype = matmul_dtype
        self.sum_outer = torch.zeros(dim, dim, dtype=torch.float64, device=device)
        self.sum = torch.zeros(dim, dtype=torch.float64, device=device)
        self.n = 0
        self._half = dim // 2 if dim >= 64 else 0  # block split of the symmetric float32 products
        self._shift: torch.Tensor | None = None  # float32 m of the window
        self._scatter: torch.Tensor | None = None  # float32 W of the window
        self._residuals: list[torch.Tensor] = []  # float32 sum (a - m) of each batch of the window
        self._window = 0  # samples in the window

    def update(self, samples: torch.Tensor) -> None:
        if samples.dim() != 2 or samples.shape[1] != self.dim:
            raise ValueError(f"samples of shape {tuple(samples.shape)}; expected (N, {self.dim})")
        self._follow(samples.device)
        x = samples.detach().to(self.matmul_dtype)
        self.n += x.shape[0]
        if self.matmul_dtype == torch.float64:
            self.sum_outer.addmm_(x.T, x)
            self.sum += x.sum(0)
            return
        if self._shift is None:
            self._shift = x.sum(0) / x.shape[0]
        shifted = x - self._shift
        self._add_shifted(shifted.T, shifted.sum(0), x.shape[0])

    def update_maps(self, maps: torch.Tensor) -> None:
        """Add a conv output (B, C, *spatial) channel-wise: equal to ``update`` of its (B·H·W, C)
        reshape (:func:`layer_samples`), without that copy."""
        if maps.dim() < 3 or maps.shape[1] != self.dim:
            raise ValueError(f"maps of shape {tuple(maps.shape)}; expected (B, {self.dim}, ...)")
        x = maps.detach()
        if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):  # (or 1x1 maps): a free view
            self.update(x.permute(0, 2, 3, 1).reshape(-1, self.dim))
            return
        self._follow(x.device)
        per_channel = x.reshape(x.shape[0], self.dim, -1).transpose(0, 1)  # (C, B, H*W), a strided view
        cols = torch.empty(per_channel.shape, dtype=self.matmul_dtype, device=x.device)
        n = x.numel() // self.dim
        cols2d = cols.view(self.dim, n)
        self.n += n
        if self.matmul_dtype == torch.float64:
            cols.copy_(per_channel)
            self.sum_outer.addmm_(cols2d, cols2d.T)
            self.sum += cols2d.sum(1)
            return
        if self._shift is None:
            self._shift = per_channel.sum((1, 2), dtype=cols.dtype) / n
        torch.sub(per_channel, self._shift[:, None, None], out=cols)
        self._add_shifted(cols2d, cols2d.sum(1), n)

    def _follow(self, device: torch.device) -> None:
        if device != self.sum.device:
            self.sum_outer, self.sum = self.sum_outer.to(device), self.sum.to(device)

    def _add_shifted(self, a: torch.Tensor, residual: torch.Tensor, n: int) -> None:
        """W += a aᵀ for a = (D, N) shifted samples (the upper blocks only for D >= 64); R gets their sum."""
        if self._scatter is None:
            self._scatter = torch.zeros(self.dim, self.dim, dtype=a.dtype, device=a.device)
        h = self._half
        if h:
            top, bottom = a[:h], a[h:]
            self._scatter[:h, :h].addmm_(top, top.T)
            self._scatter[:h, h:].addmm_(top, bottom.T)
            self._scatter[h:, h:].addmm_(bottom, bottom.T)
        else:
            self._scatter.addmm_(a, a.T)
        self._residuals.append(residual)
        self._window += n
        if len(self._residuals) >= self.FOLD_EVERY:
            self._fold()

    def _fold(self) -> None:
        """Move the float32 window into the float64 S and s: ``S += W + k m m^T + m R^T + R m^T``,
        ``s += k m + R``; the next window is shifted by the running mean."""
        if not self._residuals:
            return
        h = self._half
        if h:  # only the upper off-diagonal block was accumulated
            self._scatter[h:, :h] = self._scatter[:h, h:].T
        m = self._shift.double()
        r = torch.stack(self._residuals).double().sum(0)
        cross = torch.outer(m, r)
        self.sum_outer += self._scatter.double() + self._window * torch.outer(m, m) + cross + cross.T
        self.sum += self._window * m + r
        self._scatter.zero_()
        self._residuals, self._window = [], 0
        self._shift = (self.sum / self.n).to(self._shift.dtype)

    def reset(self) -> None:
        self.sum_outer.zero_()
        self.sum.zero_()
        self.n = 0
        self._shift, self._scatter, self._residuals, self._window = None, None, [], 0

    def all_reduce(self) -> None:
        """Sum S, s and n over the ranks of the default process group (no-op without one)."""
        self._fold()
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return
        flat = torch.cat([self.sum_outer.flatten(), self.sum, self.sum.new_tensor([self.n])])
        dist.all_reduce(flat)
        d = self.dim
        self.sum_outer = flat[: d * d].view(d, d).clone()
        self.sum = flat[d * d : d * d + d].clone()
        self.n = int(round(flat[-1].item()))

    def mean(self) -> torch.Tensor:
        self._fold()
        return self.sum / max(self.n, 1)

    def covariance(self) -> torch.Tensor:
        """Biased, centred covariance ``Q = S / n - mu mu^T`` (``np.cov(x, rowvar=False, bias=True)``)."""
        if self.n == 0:
            raise RuntimeError("covariance of no samples: no batch was recorded for this layer")
        mu = self.mean()
        return self.sum_outer / self.n - torch.outer(mu, mu)

    def second_moment(self) -> torch.Tensor:
        """Uncentred ``S / n``."""
        if self.n == 0:
            raise RuntimeError("second moment of no samples: no batch was recorded for this layer")
        self._fold()
        return self.sum_outer / self.n


def eigen_descending(cov: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (descending, negatives set to 0) and matching eigenvectors (columns) of a symmetric matrix."""
    vals, vecs = torch.linalg.eigh(cov.double())
    return vals.flip(0).clamp_min(0), vecs.flip(1)


def cumulative_shares(eigenvalues: torch.Tensor) -> torch.Tensor:
    """``p_k = sum_{i<=k} lambda_i / sum lambda`` for descending eigenvalues (NaN if all are 0)."""
    lam = eigenvalues.double()
    return lam.cumsum(0) / lam.sum()


def count_from_eigenvalues(eigenvalues: torch.Tensor, delta: float = 0.99, count: Count = "delve") -> int:
    """Number of eigen-directions kept at threshold ``delta`` (spec §2.2).

    ``delve``: #{k : p_k < delta} (the published rule; 0 for rank-1 or all-zero outputs).
    ``textbook``: min{k : p_k >= delta} (D when no share reaches delta; 0 for all-zero outputs).
    ``pca_layer``: PHD-LAB's PCA layers (§2.8): delve's count, at least 1, plus one when
    ``delta - p_k > 0.02`` (p_k the share of the kept directions), at most D.
    """
    if not delta > 0:
        raise ValueError(f"delta={delta}; expected a threshold > 0 (typically 0.97-0.9995; > 1 keeps all)")
    d = eigenvalues.numel()
    if float(eigenvalues.sum()) <= 0:
        return 0 if count != "pca_layer" else min(1, d)
    p = cumulative_shares(eigenvalues)
    below = int((p < delta).sum())
    if count == "delve":
        return below
    if count == "textbook":
        return min(below + 1, d)
    if count == "pca_layer":
        k = max(below, 1)
        if delta - float(p[k - 1]) > 0.02:
            k += 1
        return min(k, d)
    raise ValueError(f"count={count!r}; expected 'delve', 'textbook' or 'pca_layer'")


def intrinsic_dimension(cov: torch.Tensor, delta: float = 0.99, count: Count = "delve") -> int:
    """Intrinsic dimension of a covariance matrix (spec §2.2; default: delve's published rule)."""
    return count_from_eigenvalues(eigen_descending(cov)[0], delta, count)


def saturation(cov: torch.Tensor, delta: float = 0.99, count: Count = "delve") -> float:
    """``ID / D`` in [0, 1], D the layer width (spec §2.2)."""
    return intrinsic_dimension(cov, delta, count) / cov.shape[0]

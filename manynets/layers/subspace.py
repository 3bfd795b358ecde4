"""Subspace layers: a line, a quadratic Bezier curve or a simplex of networks (spec §3.1).

Wortsman et al., "Learning Neural Network Subspaces", ICML 2021 (official ``apple/learning-subspaces``,
``models/modules.py``). A subspace layer holds S parameter sets θ₀ (``weight``/``bias``, the
original names, so set 0 loads a plain network's state dict), θ₁ (``weight1``/``bias1``), θ₂, ...
and computes with the point θ = Σ_s c_s θ_s, where the coefficients c come from
:func:`subspace_coefficients`:

- line (S = 2):    θ(α) = (1−α)θ₀ + αθ₁
- curve (S = 3):   θ(α) = (1−α)²θ₀ + α²θ₁ + 2α(1−α)θ₂   (θ₁ = ``weight1`` the far endpoint,
  θ₂ = ``weight2`` the control point, as in the official code)
- simplex (S = k, 2 ≤ k ≤ 9): θ(t) = Σ_i t_i θ_i with t ≥ 0, Σ t = 1 (barycentric, t₀ = 1 − Σ_{i≥1} t_i)

BatchNorm interpolates γ and β but keeps ONE shared ``running_mean``/``running_var`` for the whole
subspace (official behaviour); statistics of a given point are recomputed with
:mod:`manynets.layers.subspace_bn`.

**Several points at once ("packed" mode).** ``coefficients`` has shape (P, S). P = 1 is the usual
single point. With P > 1 the activations carry the P points side by side in the channel dimension,
(B, P·C, ...): a conv becomes a grouped conv with the P stacked weights, BN normalises P·C channels
and a Linear is a batched matmul. The first layer may receive the plain (B, C, ...) input, which it
shares between the points. Modules without parameters that act per channel (ReLU, pooling, Flatten,
residual sums) work unchanged; a module that treats channels as structured (zero-padding shortcut)
does not, and :func:`manynets.layers.subspace_bn.check_packed` detects it.
"""

from __future__ import annotations

import math
import warnings
from typing import Iterable, Literal

import torch
import torch.nn.functional as F
from torch import nn

Kind = Literal["line", "curve", "simplex"]
KINDS = ("line", "curve", "simplex")


def num_parameter_sets(kind: str, num_vertices: int | None = None) -> int:
    """S: 2 for a line, 3 for a curve (two endpoints + control point), k for a k-vertex simplex."""
    if kind == "line":
        return 2
    if kind == "curve":
        return 3
    if kind == "simplex":
        if num_vertices is None or not 2 <= int(num_vertices) <= 9:
            raise ValueError(
                f"simplex num_vertices={num_vertices}; expected an int in 2..9 (official SimplexConv2..9)."
            )
        return int(num_vertices)
    raise ValueError(f"subspace kind={kind!r}; expected one of {KINDS}.")


def subspace_coefficients(kind: str, point, num_vertices: int | None = None) -> torch.Tensor:
    """Coefficients c (..., S) of the parameter sets at ``point`` (spec §3.1).

    ``point``: α in [0, 1] (float or tensor (...)) for a line or curve; barycentric t (..., k) for a
    simplex (non-negative, summing to 1). The curve's sets are ordered θ₀, θ₁ (far end), θ₂ (control).
    """
    if kind in ("line", "curve"):
        a = torch.as_tensor(point, dtype=torch.float32)
        if a.numel() and (a.min() < 0 or a.max() > 1):
            raise ValueError(f"{kind} point alpha={point}; expected values in [0, 1].")
        return _curve_coefficients(kind, a)
    k = num_parameter_sets(kind, num_vertices)
    t = torch.as_tensor(point, dtype=torch.float32)
    if t.shape[-1:] != (k,):
        raise ValueError(f"simplex point of shape {tuple(t.shape)}; expected (..., {k}) barycentric coordinates.")
    if t.min() < -1e-6 or not torch.allclose(t.sum(-1), torch.ones(()), atol=1e-4):
        raise ValueError(f"simplex point {point}; expected non-negative coordinates summing to 1.")
    return t


def _curve_coefficients(kind: str, a: torch.Tensor) -> torch.Tensor:
    if kind == "line":
        return torch.stack([1 - a, a], -1)
    return torch.stack([(1 - a) ** 2, a**2, 2 * a * (1 - a)], -1)


def midpoint(kind: str, num_vertices: int | None = None) -> torch.Tensor:
    """Coefficients of the evaluation point: α = 0.5 (line, curve) or the centroid (simplex)."""
    if kind == "simplex":
        k = num_parameter_sets(kind, num_vertices)
        return torch.full((k,), 1.0 / k)
    return subspace_coefficients(kind, 0.5)


def sample_coefficients(kind: str, num_vertices: int | None, n: int, device=None) -> torch.Tensor:
    """n random points (spec §3.2): α ~ U[0, 1] (line, curve) or t ~ Dirichlet(1) (simplex); (n, S)."""
    if kind == "simplex":
        k = num_parameter_sets(kind, num_vertices)
        e = torch.empty(n, k, device=device).exponential_()
        return e / e.sum(-1, keepdim=True)
    num_parameter_sets(kind, num_vertices)  # validates kind
    return _curve_coefficients(kind, torch.rand(n, device=device))  # no check: no device sync per step


def _combine(sets: list[torch.Tensor], coefficients: torch.Tensor) -> torch.Tensor:
    """Σ_s c[:, s] θ_s as (P, *θ.shape)."""
    c = coefficients.to(sets[0].dtype)
    if c.shape[0] == 1 and len(sets) == 2:
        return torch.lerp(sets[0], sets[1], c[0, 1]).unsqueeze(0)
    stacked = torch.stack(sets)  # (S, ...)
    return torch.tensordot(c, stacked, dims=1)  # (P, ...)


class SubspaceMixin:
    """Parameter sets ``name``, ``name1``, ..., ``name{S-1}`` and the current point's coefficients."""

    num_sets: int
    coefficients: torch.Tensor  # (P, S), non-persistent buffer

    def _init_subspace(self, num_sets: int, names: Iterable[str]) -> None:
        if num_sets < 2:
            raise ValueError(f"a subspace layer needs >= 2 parameter sets, got {num_sets}.")
        self.num_sets = num_sets
        self._subspace_names = [n for n in names if getattr(self, n, None) is not None]
        for name in self._subspace_names:
            base = getattr(self, name)
            for s in range(1, num_sets):
                self.register_parameter(f"{name}{s}", nn.Parameter(torch.empty_like(base)))
        ref = next((t for t in (*self.parameters(recurse=False), *self.buffers(recurse=False))), None)
        start = torch.zeros(1, num_sets, device=None if ref is None else ref.device)
        start[0, 0] = 1.0  # θ₀ until a point is set
        self.register_buffer("coefficients", start, persistent=False)

    def parameter_sets(self, name: str = "weight") -> list[torch.Tensor]:
        """[θ₀, θ₁, ...] of parameter ``name`` (``weight`` or ``bias``)."""
        return [getattr(self, name)] + [getattr(self, f"{name}{s}") for s in range(1, self.num_sets)]

    def set_coefficients(self, coefficients: torch.Tensor) -> None:
        """Set the point: coefficients (S,) or (P, S) for P points at once (packed mode)."""
        c = torch.as_tensor(coefficients).reshape(-1, self.num_sets)
        self.coefficients = c.to(device=self.coefficients.device, dtype=torch.float32)

    @property
    def num_points(self) -> int:
        return self.coefficients.shape[0]

    def point_parameter(self, name: str) -> torch.Tensor | None:
        """The parameter at the current point(s), (P, *shape); None if the layer has no ``name``."""
        if getattr(self, name, None) is None:
            return None
        return _combine(self.parameter_sets(name), self.coefficients)


class SubspaceConv2d(SubspaceMixin, nn.Conv2d):
    """Conv2d whose weight (and bias) is a point of a subspace (spec §3.1, official ``SubspaceConv``)."""

    def __init__(self, *args, num_sets: int = 2, **kwargs) -> None:
        nn.Conv2d.__init__(self, *args, **kwargs)
        self._init_subspace(num_sets, ("weight", "bias"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.num_points
        weight, bias = self.point_parameter("weight"), self.point_parameter("bias")
        if p == 1:
            return self._conv_forward(x, weight[0], None if bias is None else bias[0])
        groups = self.groups
        if x.shape[1] == self.in_channels:  # plain input shared by the P points
            if groups != 1:
                x = x.repeat(1, p, 1, 1)
                groups = groups * p
        elif x.shape[1] == p * self.in_channels:
            groups = groups * p
        else:
            raise ValueError(
                f"{type(self).__name__}: input with {x.shape[1]} channels for {p} packed points; expected "
                f"{self.in_channels} or {p}x{self.in_channels}."
            )
        w = weight.reshape(p * self.out_channels, *weight.shape[2:])
        b = None if bias is None else bias.reshape(-1)
        if self.padding_mode != "zeros":
            x = F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            return F.conv2d(x, w, b, self.stride, 0, self.dilation, groups)
        return F.conv2d(x, w, b, self.stride, self.padding, self.dilation, groups)


class SubspaceLinear(SubspaceMixin, nn.Linear):
    """Linear whose weight (and bias) is a point of a subspace; the official classifier is a
    bias-free 1x1 conv, which equals a bias-free Linear on the pooled features."""

    def __init__(self, *args, num_sets: int = 2, **kwargs) -> None:
        nn.Linear.__init__(self, *args, **kwargs)
        self._init_subspace(num_sets, ("weight", "bias"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.num_points
        weight, bias = self.point_parameter("weight"), self.point_parameter("bias")
        if p == 1:
            return F.linear(x, weight[0], None if bias is None else bias[0])
        lead = x.shape[:-1]
        if x.shape[-1] == self.in_features:
            out = torch.einsum("...f,pof->...po", x, weight)
        elif x.shape[-1] == p * self.in_features:
            out = torch.einsum("...pf,pof->...po", x.reshape(*lead, p, self.in_features), weight)
        else:
            raise ValueError(
                f"{type(self).__name__}: input with {x.shape[-1]} features for {p} packed points; expected "
                f"{self.in_features} or {p}x{self.in_features}."
            )
        if bias is not None:
            out = out + bias
        return out.reshape(*lead, p * self.out_features)


class _SubspaceBatchNorm(SubspaceMixin):
    """γ and β are points of the subspace; the running statistics are shared (official ``SubspaceBN``).

    With P > 1 packed points the layer normalises P·C channels. Its statistics are then the
    per-point buffers ``point_stats = (mean (P·C,), var (P·C,), count)`` when
    :func:`~manynets.layers.subspace_bn.collect_bn_statistics` has attached them (updated with a
    cumulative average in train mode, used in eval mode), else the shared buffers repeated.
    """

    point_stats: list | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        p = self.num_points
        weight, bias = self.point_parameter("weight"), self.point_parameter("bias")
        weight = None if weight is None else weight.reshape(-1)
        bias = None if bias is None else bias.reshape(-1)
        if p > 1 or self.point_stats is not None:
            return self._packed_forward(x, weight, bias, p)
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        use_batch = self.training or self.running_mean is None
        track = not self.training or self.track_running_stats
        return F.batch_norm(
            x, self.running_mean if track else None, self.running_var if track else None,
            weight, bias, use_batch, factor, self.eps,
        )  # fmt: skip

    def _packed_forward(self, x, weight, bias, p: int) -> torch.Tensor:
        if x.shape[1] != p * self.num_features:
            raise ValueError(
                f"{type(self).__name__}: input with {x.shape[1]} channels for {p} packed points; "
                f"expected {p}x{self.num_features}."
            )
        if self.point_stats is not None:
            mean, var, count = self.point_stats
            factor = 0.0
            if self.training:
                count[0] += 1
                factor = 1.0 / count[0]
            return F.batch_norm(x, mean, var, weight, bias, self.training, factor, self.eps)
        if self.training or self.running_mean is None:
            return F.batch_norm(x, None, None, weight, bias, True, 0.0, self.eps)
        return F.batch_norm(
            x, self.running_mean.repeat(p), self.running_var.repeat(p), weight, bias, False, 0.0, self.eps
        )


class SubspaceBatchNorm2d(_SubspaceBatchNorm, nn.BatchNorm2d):
    def __init__(self, *args, num_sets: int = 2, **kwargs) -> None:
        nn.BatchNorm2d.__init__(self, *args, **kwargs)
        self._init_subspace(num_sets, ("weight", "bias"))


class SubspaceBatchNorm1d(_SubspaceBatchNorm, nn.BatchNorm1d):
    def __init__(self, *args, num_sets: int = 2, **kwargs) -> None:
        nn.BatchNorm1d.__init__(self, *args, **kwargs)
        self._init_subspace(num_sets, ("weight", "bias"))


SUBSPACE_TYPES = (SubspaceConv2d, SubspaceLinear, SubspaceBatchNorm2d, SubspaceBatchNorm1d)


def subspace_layers(module: nn.Module) -> list[SubspaceMixin]:
    """All subspace layers of ``module`` in registration order."""
    return [m for m in module.modules() if isinstance(m, SubspaceMixin)]


def set_point(module: nn.Module, coefficients: torch.Tensor) -> None:
    """Set the same point (coefficients (S,) or (P, S)) on every subspace layer of ``module``."""
    for layer in subspace_layers(module):
        layer.set_coefficients(coefficients)


# -- conversion of a backbone -------------------------------------------------------------
def _convert(module: nn.Module, num_sets: int) -> nn.Module | None:
    dd = {"device": module.weight.device if getattr(module, "weight", None) is not None else None}
    if type(module) is nn.Conv2d:
        new = SubspaceConv2d(
            module.in_channels, module.out_channels, module.kernel_size, module.stride, module.padding,
            module.dilation, module.groups, module.bias is not None, module.padding_mode, num_sets=num_sets, **dd,
        )  # fmt: skip
    elif type(module) is nn.Linear:
        new = SubspaceLinear(module.in_features, module.out_features, module.bias is not None, num_sets=num_sets, **dd)
    elif type(module) in (nn.BatchNorm2d, nn.BatchNorm1d):
        cls = SubspaceBatchNorm2d if type(module) is nn.BatchNorm2d else SubspaceBatchNorm1d
        new = cls(module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats,
                  num_sets=num_sets, **dd)  # fmt: skip
    else:
        return None
    new.train(module.training)
    for name, param in module.named_parameters(recurse=False):
        setattr(new, name, param)  # θ₀ is the original parameter itself
    for name, buf in module.named_buffers(recurse=False):
        setattr(new, name, buf)
    return new


def _init_extra_sets(layer: SubspaceMixin, init: str) -> None:
    """Independent init of θ₁..θ_{S-1} (spec §3.1): convs/Linear ``kaiming_normal_`` fan_in (official)
    or PyTorch's default init of the layer type; BN γ = 1, β = 0; biases 0 (kaiming) or default."""
    bn = isinstance(layer, _SubspaceBatchNorm)
    for s in range(1, layer.num_sets):
        w = getattr(layer, f"weight{s}", None)
        b = getattr(layer, f"bias{s}", None)
        with torch.no_grad():
            if bn:
                if w is not None:
                    w.fill_(1.0)
                if b is not None:
                    b.zero_()
            elif init == "kaiming_fan_in":
                nn.init.kaiming_normal_(w, mode="fan_in", nonlinearity="relu")
                if b is not None:
                    b.zero_()
            else:  # PyTorch default of Conv2d / Linear
                nn.init.kaiming_uniform_(w, a=math.sqrt(5))
                if b is not None:
                    bound = 1 / math.sqrt(nn.init._calculate_fan_in_and_fan_out(w)[0])
                    nn.init.uniform_(b, -bound, bound)


def to_subspace(
    network: nn.Module,
    kind: Kind = "line",
    num_vertices: int | None = None,
    sources: list[nn.Module] | None = None,
    init: Literal["kaiming_fan_in", "default"] = "kaiming_fan_in",
) -> nn.Module:
    """Turn every Conv2d, Linear and BatchNorm1d/2d of ``network`` (stem, body and head) into a
    subspace layer, in place; returns ``network``.

    Set 0 keeps the network's own parameters and buffers (so at α = 0 / vertex 0 it computes
    exactly what it computed before). Sets 1..S-1 are initialised independently: copied from the
    matching layers of ``sources`` (S−1 networks of the same architecture, e.g. other instances of
    the backbone, which then carry the backbone's own init recipe), or else with ``init``.
    Parameters of other module types (e.g. PReLU, LayerNorm) stay shared by the whole subspace; a
    warning names them.
    """
    num_sets = num_parameter_sets(kind, num_vertices)
    if any(isinstance(m, SubspaceMixin) for m in network.modules()):
        raise ValueError(f"{type(network).__name__} already has subspace layers; convert a plain network once.")
    if sources is not None and len(sources) != num_sets - 1:
        raise ValueError(f"to_subspace({kind!r}) needs {num_sets - 1} source networks for sets 1..{num_sets - 1}, "
                         f"got {len(sources)}.")  # fmt: skip
    source_modules = [dict(src.named_modules()) for src in sources or []]
    shared = []
    for parent_name, parent in list(network.named_modules()):
        for child_name, child in list(parent.named_children()):
            new = _convert(child, num_sets)
            full = f"{parent_name}.{child_name}" if parent_name else child_name
            if new is None:
                if not isinstance(child, SubspaceMixin) and any(True for _ in child.parameters(recurse=False)):
                    shared.append(full)
                continue
            setattr(parent, child_name, new)
            if sources is None:
                _init_extra_sets(new, init)
                continue
            for s, modules in enumerate(source_modules, start=1):
                other = modules.get(full)
                if type(other) is not type(child) or other.weight.shape != child.weight.shape:
                    raise ValueError(f"to_subspace: source network {s} has no {type(child).__name__} '{full}' "
                                     "of the same shape; pass networks built by the same backbone.")  # fmt: skip
                with torch.no_grad():
                    for name, _ in child.named_parameters(recurse=False):
                        getattr(new, f"{name}{s}").copy_(getattr(other, name))
    if shared:
        warnings.warn(
            f"to_subspace: parameters of {', '.join(shared[:5])}{' ...' if len(shared) > 5 else ''} are not in "
            "subspace layers (only Conv2d, Linear, BatchNorm are converted); they are shared by all points.",
            stacklevel=2,
        )
    if not subspace_layers(network):
        raise ValueError(f"{type(network).__name__} has no Conv2d, Linear or BatchNorm layer to turn into a subspace.")
    return network


# -- regulariser ---------------------------------------------------------------------------
def cosine_similarity_squared(network: nn.Module, i: int, j: int) -> torch.Tensor:
    """cos²(v_i, v_j) = (Σ⟨θ_i, θ_j⟩)² / (Σ‖θ_i‖² · Σ‖θ_j‖²) over the weights of every conv and
    Linear (BN excluded; biases excluded, the official layers have none), spec §3.2.

    Invariant to scaling all of one set's weights by one number, not to per-layer scaling.
    """
    dots, ni, nj = [], [], []
    for layer in subspace_layers(network):
        if isinstance(layer, _SubspaceBatchNorm):
            continue
        wi, wj = layer.parameter_sets("weight")[i], layer.parameter_sets("weight")[j]
        dots.append((wi * wj).sum())
        ni.append(wi.pow(2).sum())
        nj.append(wj.pow(2).sum())
    if not dots:
        raise ValueError("cosine_similarity_squared: the network has no subspace conv or Linear layer.")
    return torch.stack(dots).sum().pow(2) / (torch.stack(ni).sum() * torch.stack(nj).sum())

"""Subspace layers: a line, a quadratic Bezier curve or a simplex of networks (spec §3.1).

Wortsman et al., "Learning Neural Network Subspaces", ICML 2021 (official ``apple/learning-subspaces``,
``models/modules.py``). A subspace layer holds S parameter sets θ₀ (``weight``/``bias``, the
original names, so set 0 loads a plain network's state dict), θ₁ (``weight1``/``bias1``), θ₂, ...
and computes with the point θ = Σ_s c_s θ_s, where the coefficients c of a line, a quadratic
Bezier curve or a simplex come from :mod:`manynets.layers.subspace_points` (re-exported here).

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

**All layers at once.** By default every layer combines its own sets in its forward (a few small ops
per layer and as many autograd nodes). Inside :func:`combined_parameters` the parameters of every
layer (one point each, the same or one per layer) are combined together before the forward, with a
handful of ``torch._foreach_*`` ops (one ``_foreach_lerp`` for a line), and the layers use them: the
same values and gradients (tested), at a fraction of the per-step overhead. The regulariser
:func:`cosine_similarity_squared` likewise runs on the concatenated weights with its gradient in closed form.
"""

from __future__ import annotations

import copy
import math
import warnings
from contextlib import contextmanager
from typing import Callable, Iterable, Iterator, Literal

import torch
import torch.nn.functional as F
from torch import nn

from manynets.layers.subspace_points import (  # noqa: F401 (re-exported: the points of a subspace)
    KINDS,
    Kind,
    midpoint,
    num_parameter_sets,
    sample_coefficients,
    subspace_coefficients,
)


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
    _combined: tuple[torch.Tensor, torch.Tensor | None] | None = None  # set inside combined_parameters

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
        start = torch.zeros(1, num_sets, device=None if ref is None else ref.device,
                            dtype=None if ref is None else ref.dtype)  # fmt: skip
        start[0, 0] = 1.0  # θ₀ until a point is set
        self.register_buffer("coefficients", start, persistent=False)

    def parameter_sets(self, name: str = "weight") -> list[torch.Tensor]:
        """[θ₀, θ₁, ...] of parameter ``name`` (``weight`` or ``bias``)."""
        return [getattr(self, name)] + [getattr(self, f"{name}{s}") for s in range(1, self.num_sets)]

    def set_coefficients(self, coefficients: torch.Tensor) -> None:
        """Set the point: coefficients (S,) or (P, S) for P points at once (packed mode), kept in the
        parameters' dtype (float64 for a float64 model)."""
        c = torch.as_tensor(coefficients).reshape(-1, self.num_sets)
        ref = next(self.parameters(recurse=False), self.coefficients)
        self.coefficients = c.to(device=self.coefficients.device, dtype=ref.dtype)

    @property
    def num_points(self) -> int:
        return self.coefficients.shape[0]

    def point_parameter(self, name: str) -> torch.Tensor | None:
        """The parameter at the current point(s), (P, *shape); None if the layer has no ``name``."""
        if getattr(self, name, None) is None:
            return None
        return _combine(self.parameter_sets(name), self.coefficients)

    def _forward_parameters(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(weight, bias) for the forward: the parameters' shape for one point (combined with the other
        layers' inside :func:`combined_parameters`, else here), (P, *shape) for P packed points."""
        if self._combined is not None:
            return self._combined
        weight, bias = self.point_parameter("weight"), self.point_parameter("bias")
        if self.coefficients.shape[0] == 1:
            return weight[0], None if bias is None else bias[0]
        return weight, bias


class SubspaceConv2d(SubspaceMixin, nn.Conv2d):
    """Conv2d whose weight (and bias) is a point of a subspace (spec §3.1, official ``SubspaceConv``)."""

    def __init__(self, *args, num_sets: int = 2, **kwargs) -> None:
        nn.Conv2d.__init__(self, *args, **kwargs)
        self._init_subspace(num_sets, ("weight", "bias"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.num_points
        weight, bias = self._forward_parameters()
        if p == 1:
            return self._conv_forward(x, weight, bias)
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
        weight, bias = self._forward_parameters()
        if p == 1:
            return F.linear(x, weight, bias)
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
    :func:`~manynets.analysis.bn_recompute.collect_bn_statistics` has attached them (updated with a
    cumulative average in train mode, used in eval mode), else the shared buffers repeated.
    """

    point_stats: list | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        p = self.num_points
        weight, bias = self._forward_parameters()
        if p > 1:
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
    """Set the same point (coefficients (S,) or (P, S)) on every subspace layer of ``module`` (one shared
    tensor per dtype and device, so :func:`combined_parameters` sees a single point)."""
    converted: dict[tuple, torch.Tensor] = {}
    for layer in subspace_layers(module):
        ref = next(layer.parameters(recurse=False), layer.coefficients)
        key = (ref.dtype, layer.coefficients.device)
        if key not in converted:
            layer.set_coefficients(coefficients)
            converted[key] = layer.coefficients
        layer.coefficients = converted[key]


def _layer_sets(layers: list[SubspaceMixin]) -> tuple[list[list[torch.Tensor]], list[int], list[torch.Tensor]]:
    """The parameter tensors of ``layers`` per set (set s: [θ_s of every tensor]), the row of each tensor's
    coefficients, and the distinct coefficient rows (1, S) (one when the layers share their point)."""
    num_sets = layers[0].num_sets
    sets: list[list[torch.Tensor]] = [[] for _ in range(num_sets)]
    rows: list[torch.Tensor] = []
    row_of: dict[int, int] = {}
    tensor_rows: list[int] = []
    for layer in layers:
        if layer.num_sets != num_sets:
            raise ValueError(f"subspace layers with {layer.num_sets} and {num_sets} parameter sets in one network.")
        c = layer.coefficients
        if id(c) not in row_of:
            row_of[id(c)] = len(rows)
            rows.append(c)
        for name in layer._subspace_names:
            base = getattr(layer, name)
            if base is None:
                continue
            sets[0].append(base)
            for s in range(1, num_sets):
                sets[s].append(getattr(layer, f"{name}{s}"))
            tensor_rows.append(row_of[id(c)])
    return sets, tensor_rows, rows


def combine_layers(layers: list[SubspaceMixin]) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """(weight, bias) of every layer at its current single point, Σ_s c_s θ_s (spec §3.1), computed for
    all layers together: one ``torch._foreach_lerp`` for a line (the same kernel as the per-layer
    ``torch.lerp``, so bit-identical), ``_foreach_mul``/``_foreach_add`` over the sets otherwise.
    Layers may share one point or have one each (``layerwise``); autograd runs through the foreach ops."""
    if not layers:
        return []
    if any(layer.coefficients.shape[0] != 1 for layer in layers):
        raise ValueError("combine_layers: every layer needs a single point (coefficients (1, S)).")
    sets, tensor_rows, rows = _layer_sets(layers)
    num_sets = len(sets)
    if len(rows) == 1:  # one point for the whole network: 0-dim coefficient tensors (no host sync)
        scalars = list(rows[0][0].unbind())
        weights = [scalars[s] for s in range(num_sets)]
    else:  # one point per layer: a list of 0-dim coefficients per set
        columns = [list(col.unbind()) for col in torch.cat(rows).unbind(1)]
        weights = [[columns[s][r] for r in tensor_rows] for s in range(num_sets)]
    if num_sets == 2:
        combined = torch._foreach_lerp(sets[0], sets[1], weights[1])
    else:
        combined = torch._foreach_mul(sets[0], weights[0])
        for s in range(1, num_sets):
            combined = torch._foreach_add(combined, torch._foreach_mul(sets[s], weights[s]))
    out, k = [], 0
    for layer in layers:
        params = []
        for name in ("weight", "bias"):
            if name in layer._subspace_names and getattr(layer, name) is not None:
                params.append(combined[k])
                k += 1
            else:
                params.append(None)
        out.append((params[0], params[1]))
    return out


@contextmanager
def combined_parameters(module: nn.Module | list[SubspaceMixin]) -> Iterator[None]:
    """Inside the block, the subspace layers of ``module`` (or the given layers) that hold one point
    compute with parameters combined for all of them at once on entry (:func:`combine_layers`), instead
    of each layer combining its sets in its forward. The values and gradients are the same.

    Points and parameters must not change inside the block (set the point first, step the optimizer
    after). Entered under ``no_grad`` the combined parameters carry no graph: a block that spans many
    forwards at a fixed point (BN recompute, evaluation) combines once for all of them.
    """
    layers = subspace_layers(module) if isinstance(module, nn.Module) else list(module)
    single = [layer for layer in layers if layer.coefficients.shape[0] == 1]
    for layer, params in zip(single, combine_layers(single)):
        layer.__dict__["_combined"] = params  # a plain attribute: skips nn.Module.__setattr__'s checks
    try:
        yield
    finally:
        for layer in single:
            layer.__dict__.pop("_combined", None)


# -- conversion of a backbone -------------------------------------------------------------
Init = Callable[[nn.Module], nn.Module]
"""Re-draws a module's parameters in place, e.g. a backbone's ``init_weights``."""


def _convert(module: nn.Module, num_sets: int) -> nn.Module | None:
    weight = getattr(module, "weight", None)
    dd = {"device": weight.device, "dtype": weight.dtype} if weight is not None else {}
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


@torch.no_grad()
def _init_extra_sets(layer: SubspaceMixin, original: nn.Module, init: str | Init) -> None:
    """Independent init of θ₁..θ_{S-1} (spec §3.1). ``init`` callable: applied to a copy of the original
    layer once per set (a backbone's own recipe, one layer at a time). ``kaiming_fan_in``: convs/Linear
    ``kaiming_normal_`` fan_in (official), biases 0; ``default``: PyTorch's init of the layer type. BN
    sets start at γ = 1, β = 0 unless a callable says otherwise."""
    fresh = copy.deepcopy(original) if callable(init) else None
    for s in range(1, layer.num_sets):
        if fresh is not None:
            init(fresh)
            for name in layer._subspace_names:
                getattr(layer, f"{name}{s}").copy_(getattr(fresh, name))
            continue
        w, b = getattr(layer, f"weight{s}", None), getattr(layer, f"bias{s}", None)
        if isinstance(layer, _SubspaceBatchNorm):
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
    init: Literal["kaiming_fan_in", "default"] | Init = "kaiming_fan_in",
) -> nn.Module:
    """Turn every Conv2d, Linear and BatchNorm1d/2d of ``network`` (stem, body and head) into a
    subspace layer, in place; returns ``network``.

    Set 0 keeps the network's own parameters and buffers (so at α = 0 / vertex 0 it computes
    exactly what it computed before). Sets 1..S-1 are initialised independently with ``init``: a
    callable that re-draws a module in place (e.g. the backbone's ``init_weights``, applied to a copy
    of each original layer, one layer at a time), ``kaiming_fan_in`` (the official init) or ``default``.
    Parameters of other module types (e.g. PReLU, LayerNorm) stay shared by the whole subspace; a
    warning names them.
    """
    num_sets = num_parameter_sets(kind, num_vertices)
    if any(isinstance(m, SubspaceMixin) for m in network.modules()):
        raise ValueError(f"{type(network).__name__} already has subspace layers; convert a plain network once.")
    if not callable(init) and init not in ("kaiming_fan_in", "default"):
        raise ValueError(f"to_subspace init={init!r}; expected 'kaiming_fan_in', 'default' or a callable.")
    shared = []
    for parent_name, parent in list(network.named_modules()):
        for child_name, child in list(parent.named_children()):
            new = _convert(child, num_sets)
            if new is None:
                if not isinstance(child, SubspaceMixin) and any(True for _ in child.parameters(recurse=False)):
                    shared.append(f"{parent_name}.{child_name}" if parent_name else child_name)
                continue
            setattr(parent, child_name, new)
            _init_extra_sets(new, child, init)
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
class _CosineSquared(torch.autograd.Function):
    """cos² of two concatenated weight vectors with its gradient in closed form (one autograd node):
    with d = ⟨v_i, v_j⟩, a = ‖v_i‖², b = ‖v_j‖², c = d²/(ab):
    ∂c/∂v_i = 2d/(ab) v_j − 2c/a v_i and ∂c/∂v_j = 2d/(ab) v_i − 2c/b v_j."""

    @staticmethod
    def forward(ctx, count: int, *weights: torch.Tensor) -> torch.Tensor:
        vi = torch.cat([w.reshape(-1) for w in weights[:count]])
        vj = torch.cat([w.reshape(-1) for w in weights[count:]])
        dot, ni, nj = vi @ vj, vi @ vi, vj @ vj
        cos2 = dot * dot / (ni * nj)
        ctx.vectors, ctx.sums, ctx.cos2 = (vi, vj), (dot, ni, nj), cos2
        ctx.shapes = [w.shape for w in weights[:count]]
        return cos2

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (vi, vj), (dot, ni, nj), cos2 = ctx.vectors, ctx.sums, ctx.cos2
        scale = 2 * grad * dot / (ni * nj)
        gi = (vj * scale).sub_(vi * (2 * grad * cos2 / ni))
        gj = (vi * scale).sub_(vj * (2 * grad * cos2 / nj))
        sizes = [s.numel() for s in ctx.shapes]
        views = [g.view(shape) for part in (gi, gj) for g, shape in zip(part.split(sizes), ctx.shapes)]
        return (None, *views)


def cosine_similarity_squared(network: nn.Module | list[SubspaceMixin], i: int, j: int) -> torch.Tensor:
    """cos²(v_i, v_j) = (Σ⟨θ_i, θ_j⟩)² / (Σ‖θ_i‖² · Σ‖θ_j‖²) over the weights of every conv and
    Linear (BN excluded; biases excluded, the official layers have none), spec §3.2; ``network``: a
    module or its subspace layers.

    Invariant to scaling all of one set's weights by one number, not to per-layer scaling.
    """
    layers = subspace_layers(network) if isinstance(network, nn.Module) else network
    wi, wj = [], []
    for layer in layers:
        if isinstance(layer, _SubspaceBatchNorm):
            continue
        wi.append(getattr(layer, "weight" if i == 0 else f"weight{i}"))
        wj.append(getattr(layer, "weight" if j == 0 else f"weight{j}"))
    if not wi:
        raise ValueError("cosine_similarity_squared: the network has no subspace conv or Linear layer.")
    return _CosineSquared.apply(len(wi), *wi, *wj)

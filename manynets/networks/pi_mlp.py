"""The π-net MLP as a backbone: infinite-width π-layers (``width: 0``) or their finite twin (``width: n``).

Yang, Santacroce & Hu, "Efficient Computation of Deep Nonlinear Infinite-Width Neural Networks that
Learn Features" (π-limit), ICLR 2022; official ``santacml/pilim`` (spec pinet_saturation §1.2-§1.7).
Trained by :class:`~manynets.lightning_modules.PiNetModule` (π-SGD); as YAML::

    backbone:
      class_path: manynets.networks.PiMLP
      init_args: {r: 400, depth: 2, width: 0, bias_alpha: 0.5, last_layer_alpha: 0.5}

**depth** counts hidden (preactivation) layers, as the paper, ``pilimit_orig`` (``InfPiMLP(L)``) and
:class:`~manynets.networks.MLP` do: an input layer (d_in -> r), ``depth - 1`` hidden layers and a readout
(-> num_classes). ``pilimit_lib``'s ``InfMLP(d_in, d_out, r, L)`` has ``L + 1`` hidden layers, so
**lib ``--depth k`` = manynets ``depth: k + 1``**; orig ``--depth 2`` (the paper's CIFAR-10 command) =
``depth: 2`` = lib ``--depth 1``.

Seams. The ReLU of a π-net is inside the next layer, so every layer outputs a preactivation:

- ``stem`` = Flatten + input layer: ``g1 = alpha_1 (x A1 + beta b1)``
  (:class:`~manynets.layers.pi.PiInputLayer`; finite: a :class:`~manynets.layers.pi_finite.FinPiLayer`,
  whose ``linear`` is an ordinary ``nn.Linear``);
- ``body`` = the ``depth - 1`` hidden layers (:class:`~manynets.layers.pi.InfPiLayer`; finite:
  PiReLU, FinPiLayer pairs);
- ``pool`` = Identity; ``head`` = the readout, ``alpha_{L+1} (readout(g_L) + beta' b)`` (finite: PiReLU,
  FinPiLayer).

``stem_channels`` = ``feature_dim`` = r for the infinite net (the stem outputs the r coefficients g of
the infinite-width preactivation ``h = n^-1/2 Omega g``), the width n for the finite twin (its
preactivation h itself). ``features(x)`` is the last hidden preactivation (g_L or h_L);
:meth:`PiMLP.kernel_features` gives the feature kernel's features (spec §1.8).

Initialisation: the constructor draws the official state (infinite: A1, then per layer B and A from a
generator seeded by ``seed``, or the global one; finite: an infinite net so drawn, then Omega from
``seed + 1``, spec §1.7), so it does not call ``init_weights``. :meth:`PiMLP.init_weights` re-draws a
part from the global generator: an infinite layer goes back to its initial state (M = r rows, the
appended rows dropped); a finite layer is re-sampled from a freshly drawn infinite layer through the
net's Omega (Gaussian N(0, 2 / fan_in) with ``gaussian_init``).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from manynets.cuda_ops.pi_kernel import DEFAULT_CHUNK
from manynets.errors import check_arg
from manynets.layers.pi import DEFAULT_BLOCK_ROWS, STATE_DTYPES, InfPiLayer, PiInputLayer, StateDtype
from manynets.layers.pi_finite import FinPiLayer, PiReLU, twin_weights

from .base import ARG, Backbone


class PiMLP(Backbone):
    """π-net MLP on flattened images (module doc).

    Args:
        num_classes: outputs of the readout.
        image_shape: (C, H, W); the input dimension is C·H·W.
        r: rank of the π-limit (coefficient dimension).
        depth: hidden layers (module doc; lib's ``--depth`` + 1).
        width: 0 = infinite π-net; n >= 1 = finite π-net (or μ-net with ``gaussian_init``) of width n.
        first_layer_alpha: alpha_1, the multiplier of the input layer (spec §1.3).
        last_layer_alpha: alpha_{L+1}, the multiplier of the readout (spec §1.3).
        bias_alpha: beta of the input and hidden layers.
        last_bias_alpha: beta of the readout (None: ``bias_alpha``).
        layernorm: s := 1 inside each π-layer; the finite twin normalises before its ReLU.
        readout_zero_init: readout A = 0 (lib; output 0 at init) or N(0, 1) / r (orig).
        state_dtype: dtype of A and B of the infinite layers (Amult is fp32); the finite twin is fp32.
        chunk_size: rows of M per kernel chunk (infinite layers).
        block_size: rows per block of the infinite layers' A/B storage (growth appends blocks, never copies).
        gaussian_init: finite only: every weight N(0, 2 / fan_in) (the μ-net baseline).
        gproj: finite only: project gradients onto span(Omega_l) (:meth:`project_gradients`).
        seed: seed of the initial state and Omega (None: the global generator).
    """

    def __init__(
        self,
        num_classes: int,
        image_shape: tuple[int, int, int] = (3, 32, 32),
        *,
        r: int = 200,
        depth: int = 2,
        width: int = 0,
        first_layer_alpha: float = 1.0,
        last_layer_alpha: float = 1.0,
        bias_alpha: float = 1.0,
        last_bias_alpha: float | None = None,
        layernorm: bool = False,
        readout_zero_init: bool = True,
        state_dtype: StateDtype = "float32",
        chunk_size: int = DEFAULT_CHUNK,
        block_size: int = DEFAULT_BLOCK_ROWS,
        gaussian_init: bool = False,
        gproj: bool = True,
        seed: int | None = None,
    ) -> None:
        super().__init__()
        check_arg(r >= 1, ARG + "r", r, ">= 1 (rank of the π-limit)", "The paper uses r = 200 or 400.")
        check_arg(depth >= 1, ARG + "depth", depth, ">= 1 hidden layers", "pilimit_lib's --depth k is depth: k + 1.")
        check_arg(width >= 0, ARG + "width", width, "0 (infinite π-net) or the finite width n >= 1")
        check_arg(chunk_size >= 1, ARG + "chunk_size", chunk_size, ">= 1 rows per kernel chunk")
        check_arg(block_size >= 1, ARG + "block_size", block_size, ">= 1 rows per block of the π-state",
                  f"The default {DEFAULT_BLOCK_ROWS} equals the default chunk_size.")  # fmt: skip
        check_arg(state_dtype in STATE_DTYPES, ARG + "state_dtype", state_dtype, f"one of {sorted(STATE_DTYPES)}")
        self.num_classes, self.d_in, self.r = num_classes, math.prod(image_shape), r
        self.depth, self.width = depth, width
        self.layernorm, self.readout_zero_init, self.gaussian_init, self.gproj = (
            layernorm, readout_zero_init, gaussian_init, gproj)  # fmt: skip
        self.state_dtype, self.chunk_size, self.block_size = state_dtype, chunk_size, block_size
        self._betas = (bias_alpha, bias_alpha if last_bias_alpha is None else last_bias_alpha)
        self._alphas = (first_layer_alpha, last_layer_alpha)
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        inf = [self._infinite_layer(l, gen) for l in range(depth + 1)]
        if width == 0:
            self.stem = nn.Sequential(nn.Flatten(), inf[0])
            self.body = nn.Sequential(*inf[1:-1])
            self.pool = nn.Identity()
            self.head = inf[-1]
            self.stem_channels = self.feature_dim = r
            return
        dims = [self.d_in] + [width] * depth + [num_classes]
        lins = [FinPiLayer(dims[l], dims[l + 1], alpha=self._alpha(l), bias_alpha=self._beta(l), index=l)
                for l in range(depth + 1)]  # fmt: skip
        gen = torch.Generator().manual_seed(seed + 1) if seed is not None else None
        for lin in lins[:-1]:
            lin.set_omega(torch.randn(width, r, generator=gen))
        self.stem = nn.Sequential(nn.Flatten(), lins[0])
        self.body = nn.Sequential(*[m for lin in lins[1:-1] for m in (PiReLU(layernorm), lin)])
        self.pool = nn.Identity()
        self.head = nn.Sequential(PiReLU(layernorm), lins[-1])
        self.stem_channels = self.feature_dim = width
        with torch.no_grad():
            for l, (lin, layer) in enumerate(zip(lins, inf)):
                _copy_twin(lin, layer, lins[l - 1].omega if l else None, width)
            if gaussian_init:
                for lin in lins:
                    lin.linear.weight.normal_(0.0, (2.0 / lin.linear.in_features) ** 0.5, generator=gen)

    # -- layers ----------------------------------------------------------------------
    def _alpha(self, l: int) -> float:
        return self._alphas[0] if l == 0 else self._alphas[1] if l == self.depth else 1.0

    def _beta(self, l: int) -> float:
        return self._betas[1] if l == self.depth else self._betas[0]

    def _infinite_layer(self, l: int, generator: torch.Generator | None) -> PiInputLayer | InfPiLayer:
        """Layer l (0: input, ``depth``: readout) of the infinite net, freshly drawn."""
        if l == 0:
            return PiInputLayer(self.d_in, self.r, alpha=self._alpha(0), bias_alpha=self._beta(0), generator=generator)
        readout = l == self.depth
        return InfPiLayer(
            self.r, self.num_classes if readout else self.r, zero_init=readout and self.readout_zero_init,
            a_std=1.0 / self.r if readout else None, alpha=self._alpha(l), bias_alpha=self._beta(l),
            layernorm=self.layernorm, state_dtype=self.state_dtype if self.width == 0 else "float32",
            chunk_size=self.chunk_size, block_size=self.block_size, generator=generator,
        )  # fmt: skip

    def layers(self) -> list[nn.Module]:
        """The ``depth + 1`` preactivation layers in order: input, hidden..., readout."""
        if self.width == 0:
            return [self.stem[1], *self.body, self.head]
        return [self.stem[1], *self.body[1::2], self.head[1]]

    # -- π-net specifics ---------------------------------------------------------------
    @property
    def infinite(self) -> bool:
        return self.width == 0

    def kernel_features(self, x: torch.Tensor) -> torch.Tensor:
        """Features of the feature kernel (spec §1.8): the unit last hidden coefficients ``gbar_L`` of
        the infinite net, the penultimate post-ReLU activations of the finite twin."""
        feats = self.features(x)
        if self.infinite:
            return feats / feats.norm(dim=1, keepdim=True).clamp_min(1e-20)
        return self.head[0](feats)

    def project_gradients(self) -> None:
        """Finite twin with ``gproj``: project every non-readout gradient onto span(Omega_l) (spec §1.7)."""
        if not self.infinite and self.gproj:
            for lin in self.layers()[:-1]:
                lin.project_gradient()

    @torch.no_grad()
    def sample_from(self, infinite: PiMLP) -> PiMLP:
        """Set this finite twin's weights to the sample of the (e.g. trained) infinite π-net ``infinite``
        through this net's Omega (spec §1.7, official ``FinPiMLPSample(infnet, n)``); returns ``self``."""
        mine, theirs = [(n.d_in, n.num_classes, n.r, n.depth) for n in (self, infinite)]
        if self.infinite or not infinite.infinite or mine != theirs:
            raise ValueError(f"sample_from: a finite PiMLP samples an infinite one of the same (d_in, classes, r, "
                             f"depth); got width {self.width} {mine} from width {infinite.width} {theirs}.")
        lins = self.layers()
        for l, (lin, layer) in enumerate(zip(lins, infinite.layers())):
            _copy_twin(lin, layer, lins[l - 1].omega if l else None, self.width)
        return self

    def state_bytes(self) -> int:
        """Bytes of all parameters and π-state now (the M rows of A/B, not their storage's last partial block)."""
        pi_state = sum(m.state_nbytes() for m in self.modules() if isinstance(m, InfPiLayer))
        return pi_state + sum(p.numel() * p.element_size() for p in self.parameters())

    @torch.no_grad()
    def init_weights(self, module: nn.Module) -> nn.Module:
        """Re-draw the π-layers of ``module`` in place from the global generator (module doc); returns it.

        Infinite: every PiInputLayer / InfPiLayer is reset. Finite: the weight of every ``nn.Linear`` of
        the twin (also a bare copy of one; found by its ``pi_index``) is re-sampled from a freshly drawn
        infinite layer through the net's Omega (``gaussian_init``: N(0, 2 / fan_in)); FinPiLayer biases
        go to 0, the twin of a fresh infinite layer's zero bias.
        """
        for m in module.modules():
            if isinstance(m, (PiInputLayer, InfPiLayer)):
                m.reset_parameters()
            elif isinstance(m, FinPiLayer):
                m.bias.zero_()
            elif isinstance(m, nn.Linear) and hasattr(m, "pi_index"):
                l = m.pi_index
                if self.gaussian_init:
                    m.weight.normal_(0.0, (2.0 / m.in_features) ** 0.5)
                    continue
                omegas = [layer.omega for layer in self.layers()[:-1]]
                fresh = self._infinite_layer(l, None).to(omegas[0].device)  # drawn on the CPU, as at construction
                weight, _ = twin_weights(fresh, omegas[l - 1] if l else None, omegas[l] if l < self.depth else None,
                                         self.width)  # fmt: skip
                m.weight.copy_(weight)
        return module


@torch.no_grad()
def _copy_twin(lin: FinPiLayer, layer: PiInputLayer | InfPiLayer, omega_prev: torch.Tensor | None, n: int) -> None:
    """Set ``lin`` to the finite twin of the π-layer ``layer`` (spec §1.7)."""
    weight, bias = twin_weights(layer, omega_prev, lin.omega, n)
    lin.linear.weight.copy_(weight)
    lin.bias.copy_(bias)

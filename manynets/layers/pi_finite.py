"""The finite π-net twin (spec pinet_saturation §1.7): its layers and the sampling of its weights.

For each hidden preactivation layer l = 1..L draw ``Omega_l`` (n x r) iid N(0, 1) (fp32) and set

- input   ``W_1 = n^-1/2 Omega_1 A1^T``,  ``b_1 = n^-1/2 Omega_1 b1``
- hidden  ``W_l = n^-1 Omega_l (Amult * A)^T relu(Omega_{l-1} B^T)^T``,  ``b_l = n^-1/2 Omega_l b``
- readout ``W_{L+1} = n^-1/2 (Amult * A)^T relu(Omega_L B^T)^T``,  ``b_{L+1} = b`` (copied)

(:func:`twin_weights`) so that each preactivation is ``h_l ~= n^-1/2 Omega_l g_l`` and the output
converges to the infinite net's as n grows. This is ``pilimit_orig``'s ``sample``. ``pilimit_lib``'s
``FinPiMLPSample`` scales the readout by ``d_out^-1/2`` instead of ``n^-1/2`` and drops the readout bias,
which makes a trained net's output sqrt(n / d_out) times too large; manynets implements the original
formula only.

The twin is an ordinary MLP: each layer is a :class:`FinPiLayer`, an ``nn.Linear`` without bias (the
weight W) plus the π multipliers and the bias, ``h = alpha (W x + beta b)``, with :class:`PiReLU`
activations between layers (``relu(h)``, optionally ``h / (1e-5 + |h|)`` first, ``layernorm``). Hooks on
the ``nn.Linear`` see ``W x``, the preactivation up to the shift ``beta b`` and the factor ``alpha``
(covariance spectra and saturation are unchanged by both); subspace methods turn the ``nn.Linear``
into a subspace layer. Training: :meth:`FinPiLayer.project_gradient` replaces the gradient of a
non-readout weight and bias by ``P_l grad`` with ``P_l = Omega_l (Omega_l^T Omega_l)^-1 Omega_l^T``
(``Gproj``), before weight decay is added. The network is :class:`manynets.networks.PiMLP` with
``width > 0``.
"""

from __future__ import annotations

import torch
from torch import nn

from manynets.cuda_ops.pi_kernel import row_chunks
from manynets.layers.pi import InfPiLayer, PiInputLayer


class FinPiLayer(nn.Module):
    """``h = alpha (linear(x) + beta b)``: one layer of the finite twin (module doc).

    ``linear`` is a bias-free ``nn.Linear`` holding W; ``linear.pi_index`` (kept by copies of it) and
    ``index`` are the layer's position l - 1 in the net (0: input layer). A layer that projects its
    gradients holds ``omega`` (Omega_l, n x r) and ``gcovinv`` ((Omega_l^T Omega_l)^-1) as buffers
    (:meth:`set_omega`); the readout holds neither.
    """

    def __init__(self, in_features: int, out_features: int, *, alpha: float = 1.0, bias_alpha: float = 1.0,
                 index: int = 0) -> None:  # fmt: skip
        super().__init__()
        linear = nn.Linear(in_features, out_features)  # draws W and b as nn.Linear does (the twin overwrites both)
        self.bias = nn.Parameter(linear.bias.detach())
        linear.bias = None
        linear.pi_index = index
        self.linear = linear
        self.alpha, self.bias_alpha, self.index = alpha, bias_alpha, index
        self.register_buffer("omega", None)
        self.register_buffer("gcovinv", None)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, bias_alpha={self.bias_alpha}"

    @torch.no_grad()
    def set_omega(self, omega: torch.Tensor) -> None:
        """Omega_l (out_features x r) of this layer and its inverse Gram matrix."""
        self.omega = omega
        self.gcovinv = torch.linalg.inv(omega.T @ omega)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.linear(x) + self.bias_alpha * self.bias
        return h if self.alpha == 1.0 else self.alpha * h

    @torch.no_grad()
    def project_gradient(self) -> None:
        """grad <- Omega (Omega^T Omega)^-1 Omega^T grad for the weight and the bias (no-op without Omega)."""
        if self.omega is None:
            return
        for p in (self.linear.weight, self.bias):
            if p.grad is not None:
                g = p.grad.reshape(p.shape[0], -1)
                g.copy_(self.omega @ (self.gcovinv @ (self.omega.T @ g)))


class PiReLU(nn.Module):
    """``relu(h)``, or ``relu(h / (1e-5 + |h|))`` with ``layernorm`` (the finite twin's activation)."""

    def __init__(self, layernorm: bool = False) -> None:
        super().__init__()
        self.layernorm = layernorm

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if self.layernorm:
            h = h / (1e-5 + h.norm(dim=1, keepdim=True))
        return torch.relu(h)


def _readout_sum(layer: InfPiLayer, omega_prev: torch.Tensor, chunk: int = 65536) -> torch.Tensor:
    """sum over M of (Amult * A)^T relu(B Omega_prev^T): (r_out x n), chunked over M, in Omega's dtype."""
    out, dtype = omega_prev.new_zeros(layer.r_out, omega_prev.shape[0]), omega_prev.dtype
    for A, B, Amult in row_chunks(chunk, layer.state_blocks("A"), layer.state_blocks("B"), layer.Amult.detach()):
        a = A.to(dtype) * Amult[:, None].to(dtype)
        out += a.T @ torch.relu(B.to(dtype) @ omega_prev.T)
    return out


@torch.no_grad()
def twin_weights(layer: PiInputLayer | InfPiLayer, omega_prev: torch.Tensor | None, omega: torch.Tensor | None,
                 n: int) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """(weight, bias) of the finite twin of one π-layer (module doc): ``layer`` is the input layer
    (``omega_prev`` unused), a hidden layer, or the readout (``omega`` None). Computed in Omega's dtype."""
    if isinstance(layer, PiInputLayer):
        A1, b1 = layer.A1.detach().to(omega.dtype), layer.bias.detach().to(omega.dtype)
        return omega @ A1.T * n**-0.5, omega @ b1 * n**-0.5
    if omega is not None:
        return omega @ _readout_sum(layer, omega_prev) / n, omega @ layer.bias.detach().to(omega.dtype) * n**-0.5
    return _readout_sum(layer, omega_prev) * n**-0.5, layer.bias.detach().clone()

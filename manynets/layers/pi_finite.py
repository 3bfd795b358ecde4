"""``FinPiMLP``: the finite π-net sampled from an infinite one, and the μ-net baseline (spec §1.7).

For each hidden preactivation layer l = 1..L draw ``Omega_l`` (n x r) iid N(0, 1) (fp32) and set

- input   ``W_1 = n^-1/2 Omega_1 A1^T``,  ``b_1 = n^-1/2 Omega_1 b1``
- hidden  ``W_l = n^-1 Omega_l (Amult * A)^T relu(Omega_{l-1} B^T)^T``,  ``b_l = n^-1/2 Omega_l b``
- readout ``W_{L+1} = n^-1/2 (Amult * A)^T relu(Omega_L B^T)^T``,  ``b_{L+1} = b`` (copied)

so that each preactivation is ``h_l ~= n^-1/2 Omega_l g_l`` and the output converges to the infinite
net's as n grows. This is ``pilimit_orig``'s ``sample``. ``pilimit_lib``'s ``FinPiMLPSample`` scales
the readout by ``d_out^-1/2`` instead of ``n^-1/2`` and drops the readout bias, which makes a trained
net's output sqrt(n / d_out) times too large; manynets implements the original formula only.

Forward: an ordinary MLP ``h_1 = alpha_1 (W_1 x + beta b_1)``, ``x = relu(h)`` (optionally
``h / (1e-5 + |h|)`` first, ``layernorm``), ``out = alpha_{L+1} (W_{L+1} x + beta' b_{L+1})``.
Training (``PiSGD`` treats every tensor as an ordinary parameter): call :meth:`project_gradients`
after backward, which replaces the gradient of every non-readout weight and bias by
``P_l grad`` with ``P_l = Omega_l (Omega_l^T Omega_l)^-1 Omega_l^T`` (``Gproj``), before weight decay
is added. ``gaussian_init=True`` re-draws every weight as N(0, 2 / fan_in): the μ-net baseline of the
paper (run with ``gproj=False``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from manynets.layers.pi_mlp import InfMLP


def _sample_readout(layer, omega_prev: torch.Tensor, chunk: int = 65536) -> torch.Tensor:
    """sum over M of (Amult * A)^T relu(B Omega_prev^T): (r_out x n), chunked over M."""
    out = omega_prev.new_zeros(layer.r_out, omega_prev.shape[0])
    for lo in range(0, layer.num_rows, chunk):
        hi = min(lo + chunk, layer.num_rows)
        a = layer.A[lo:hi].float() * layer.Amult[lo:hi, None]
        out += a.T @ torch.relu(layer.B[lo:hi].float() @ omega_prev.T)
    return out


class FinPiMLP(nn.Module):
    """Finite-width π-MLP of width n (module doc).

    Args:
        d_in, d_out, r, depth, first_layer_alpha, last_layer_alpha, bias_alpha, last_bias_alpha, layernorm:
            as :class:`~manynets.layers.pi_mlp.InfMLP` (a fresh infinite net with these is sampled).
        width: n, the units per hidden layer.
        gaussian_init: re-draw every weight N(0, 2 / fan_in) (μ-net baseline).
        gproj: project gradients onto span(Omega_l) in :meth:`project_gradients`.
        seed: seed of the infinite net and of Omega (None: the global generator).
    """

    def __init__(self, d_in: int, d_out: int, r: int = 200, depth: int = 2, width: int = 1024, *,
                 first_layer_alpha: float = 1.0, last_layer_alpha: float = 1.0, bias_alpha: float = 1.0,
                 last_bias_alpha: float | None = None, layernorm: bool = False, gaussian_init: bool = False,
                 gproj: bool = True, seed: int | None = None, infnet: InfMLP | None = None) -> None:  # fmt: skip
        super().__init__()
        if width < 1:
            raise ValueError(f"FinPiMLP width={width}; expected >= 1 (width 0 means the infinite InfMLP).")
        if infnet is None:
            infnet = InfMLP(d_in, d_out, r, depth, first_layer_alpha=first_layer_alpha,
                            last_layer_alpha=last_layer_alpha, bias_alpha=bias_alpha,
                            last_bias_alpha=last_bias_alpha, layernorm=layernorm, seed=seed)  # fmt: skip
        gen = torch.Generator().manual_seed(seed + 1) if seed is not None else None
        n, r, depth = width, infnet.r, infnet.depth
        self.width, self.r, self.depth, self.gproj, self.layernorm = n, r, depth, gproj, infnet.output.layernorm
        self.first_layer_alpha, self.last_layer_alpha = infnet.input.alpha, infnet.last_layer_alpha
        self.bias_alphas = [infnet.input.bias_alpha] + [l.bias_alpha for l in infnet.pi_layers()]
        self.feature_dim = n
        dims = [infnet.d_in] + [n] * depth + [infnet.d_out]
        self.linears = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))
        with torch.no_grad():
            omegas = [torch.randn(n, r, generator=gen) for _ in range(depth)]
            for l, omega in enumerate(omegas):
                self.register_buffer(f"omega{l}", omega)
                self.register_buffer(f"gcovinv{l}", torch.linalg.inv(omega.T @ omega))
            first = self.linears[0]
            first.weight.copy_(omegas[0] @ infnet.input.A1.detach().T * n**-0.5)
            first.bias.copy_(omegas[0] @ infnet.input.bias.detach() * n**-0.5)
            for l, layer in enumerate(infnet.hidden, start=1):
                self.linears[l].weight.copy_(omegas[l] @ _sample_readout(layer, omegas[l - 1]) / n)
                self.linears[l].bias.copy_(omegas[l] @ layer.bias.detach().float() * n**-0.5)
            self.linears[-1].weight.copy_(_sample_readout(infnet.output, omegas[-1]) * n**-0.5)
            self.linears[-1].bias.copy_(infnet.output.bias.detach())
            if gaussian_init:
                for lin in self.linears:
                    lin.weight.normal_(0.0, (2.0 / lin.in_features) ** 0.5, generator=gen)

    def _act(self, h: torch.Tensor) -> torch.Tensor:
        if self.layernorm:
            h = h / (1e-5 + h.norm(dim=1, keepdim=True))
        return torch.relu(h)

    def preactivations(self, x: torch.Tensor) -> list[torch.Tensor]:
        """[h_1, ..., h_L, out] (the readout without alpha_{L+1})."""
        x, hs = x.flatten(1), []
        for l, lin in enumerate(self.linears):
            h = F.linear(x, lin.weight) + self.bias_alphas[l] * lin.bias
            hs.append(self.first_layer_alpha * h if l == 0 else h)
            x = self._act(hs[-1])
        return hs

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate post-ReLU activations (b x n), the finite feature kernel's features (spec §1.8)."""
        return self._act(self.preactivations(x)[-2])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last_layer_alpha * self.preactivations(x)[-1]

    @torch.no_grad()
    def project_gradients(self) -> None:
        """grad <- Omega_l (Omega_l^T Omega_l)^-1 Omega_l^T grad for every non-readout weight and bias."""
        if not self.gproj:
            return
        for l in range(self.depth):
            omega, gcovinv = getattr(self, f"omega{l}"), getattr(self, f"gcovinv{l}")
            for p in (self.linears[l].weight, self.linears[l].bias):
                if p.grad is not None:
                    g = p.grad.reshape(p.shape[0], -1)
                    g.copy_(omega @ (gcovinv @ (omega.T @ g)))

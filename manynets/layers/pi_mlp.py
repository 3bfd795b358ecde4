"""``InfMLP``: the infinite-width π-net MLP (spec pinet_saturation §1.2, §1.3).

**depth** counts hidden (preactivation) layers, as the paper, ``pilimit_orig`` (``InfPiMLP(L)``) and
``manynets.networks.MLP`` do: one input layer (d_in -> r), ``depth - 1`` infinite hidden layers
(r -> r) and an infinite readout (r -> d_out). ``pilimit_lib``'s ``InfMLP(d_in, d_out, r, L)`` has
``L + 1`` hidden layers, so **lib ``--depth k`` = manynets ``depth: k + 1``**; orig ``--depth 2`` (the
paper's CIFAR-10 command) = manynets ``depth: 2`` = lib ``--depth 1``.

Forward: ``g1 = alpha_1 (x A1 + beta b1)``, ``g_{l+1} = pi_layer(g_l)``, output
``alpha_{L+1} (readout(g_L) + beta' b)``; the readout starts at A = 0 (output 0 at init, ``pilimit_lib``);
``readout_zero_init=False`` draws A ~ N(0, 1) / r as ``pilimit_orig``.
"""

from __future__ import annotations

import torch
from torch import nn

from manynets.cuda_ops.pi_kernel import DEFAULT_CHUNK
from manynets.layers.pi import GROWTH, InfPiLayer, PiInputLayer, StateDtype, to_state_dtype


class InfMLP(nn.Module):
    """Infinite-width π-MLP on flattened inputs.

    Args:
        d_in: input dimension (C*H*W of an image; inputs are flattened).
        d_out: outputs (classes).
        r: rank of the π-limit (coefficient dimension).
        depth: hidden layers (module doc; lib's ``--depth`` + 1).
        first_layer_alpha, last_layer_alpha: alpha_1 and alpha_{L+1}.
        bias_alpha: beta of the input and hidden layers; last_bias_alpha: beta of the readout (None: bias_alpha).
        layernorm: s := 1 inside each π-layer.
        readout_zero_init: readout A = 0 (lib) or N(0, 1) / r (orig).
        state_dtype: dtype of A and B (Amult is fp32).
        chunk_size: rows per chunk of the kernel.
        seed: seed of the initial state (None: the global generator).
    """

    def __init__(self, d_in: int, d_out: int, r: int = 200, depth: int = 2, *, first_layer_alpha: float = 1.0,
                 last_layer_alpha: float = 1.0, bias_alpha: float = 1.0, last_bias_alpha: float | None = None,
                 layernorm: bool = False, readout_zero_init: bool = True, state_dtype: StateDtype = "float32",
                 chunk_size: int = DEFAULT_CHUNK, seed: int | None = None) -> None:  # fmt: skip
        super().__init__()
        if depth < 1:
            raise ValueError(f"InfMLP depth={depth}; expected >= 1 hidden layers (lib --depth k is depth k + 1).")
        if r < 1 or d_in < 1 or d_out < 1:
            raise ValueError(f"InfMLP d_in={d_in}, d_out={d_out}, r={r}; expected all >= 1.")
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        kw = dict(layernorm=layernorm, state_dtype=state_dtype, chunk_size=chunk_size, generator=gen)
        self.d_in, self.d_out, self.r, self.depth = d_in, d_out, r, depth
        self.input = PiInputLayer(d_in, r, alpha=first_layer_alpha, bias_alpha=bias_alpha, generator=gen)
        self.hidden = nn.ModuleList(InfPiLayer(r, r, bias_alpha=bias_alpha, **kw) for _ in range(depth - 1))
        beta_out = bias_alpha if last_bias_alpha is None else last_bias_alpha
        self.output = InfPiLayer(r, d_out, zero_init=readout_zero_init, a_std=1.0 / r, bias_alpha=beta_out, **kw)
        self.last_layer_alpha = last_layer_alpha
        self.feature_dim = r

    def pi_layers(self) -> list[InfPiLayer]:
        return [*self.hidden, self.output]

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The last hidden preactivation coefficients g_L (b x r); the feature kernel normalises them."""
        g = self.input(x.flatten(1))
        for layer in self.hidden:
            g = layer(g)
        return g

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last_layer_alpha * self.output(self.features(x))

    def state_bytes(self) -> int:
        """Bytes of all parameters and π-state now."""
        return sum(p.numel() * p.element_size() for p in self.parameters())


def estimate_memory(d_in: int, d_out: int, r: int, depth: int, batch_size: int, steps: int,
                    state_dtype: StateDtype = "float32", chunk_size: int = DEFAULT_CHUNK) -> dict[str, float]:  # fmt: skip
    """Final state size and peak training memory after ``steps`` steps of ``batch_size`` (spec §1.9).

    Each infinite layer ends with M = r + batch_size * steps rows of A (r_out), B (r) in ``state_dtype``
    and Amult in fp32. The storage is over-allocated by up to ``GROWTH`` (1.5) so appends are amortised,
    and growing one layer briefly holds its old and new storage; the kernel adds a few (batch x chunk)
    fp32 matrices. Returns ``rows`` (M), ``state`` (bytes of a checkpoint's tensors) and ``peak``
    (upper bound of the bytes held during training, excluding activations of the input layer).
    """
    item = to_state_dtype(state_dtype).itemsize
    m = r + batch_size * steps
    layers = [m * (r_out + r) * item + 4 * m + 4 * r_out for r_out in [r] * (depth - 1) + [d_out]]
    state = sum(layers) + 4 * (d_in * r + r)
    work = 6 * 4 * batch_size * min(chunk_size, m)
    return {"rows": m, "state": state, "peak": GROWTH * sum(layers) + max(layers) + 4 * (d_in * r + r) + work}

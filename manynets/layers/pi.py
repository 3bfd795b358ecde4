"""π-layers: the input layer and the infinite-width hidden/output layers of the π-limit.

Yang, Santacroce & Hu, "Efficient Computation of Deep Nonlinear Infinite-Width Neural Networks that
Learn Features", ICLR 2022 (official code ``santacml/pilim``; spec pinet_saturation §1.2-§1.4).

A finite preactivation of width n is ``h = n^-1/2 Omega g`` with ``Omega`` (n x r) iid N(0, 1); in the
limit a layer is described by the r-dim coefficient vector ``g`` of each sample. The ReLU is *inside*
the next layer, so every layer outputs a preactivation.

- :class:`PiInputLayer`: ``g1 = alpha_1 (x A1 + beta b1)``; ``A1`` (d_in x r) with unit-norm columns,
  an ordinary parameter trained by SGD.
- :class:`InfPiLayer`: state ``A`` (M x r_out), ``B`` (M x r, unit rows), ``Amult`` (M, always fp32)
  and a bias. ``g' = (phi(gbar B^T) s * Amult) A + beta bias`` with ``s = |g|``, ``gbar = g / s``
  (``manynets.cuda_ops.pi_kernel``, chunked over M). Training does not change the state: the custom
  backward (:class:`PiLinearFunction`, spec §1.4) returns per-sample rows ``a = delta * s`` and
  ``b = gbar``, and :class:`~manynets.layers.pi_optim.PiSGD` appends them with ``Amult = -lr``
  (M grows by the batch size at every step, spec §1.5).

``A``/``B`` are stored in ``state_dtype`` (fp32, bf16 or fp16; the paper uses fp16), ``Amult`` in
fp32 (it accumulates ``-lr`` and weight-decay factors; fp16 "eventually incurs large errors").
``layernorm=True`` uses ``s := 1`` inside the layer (official option, not used in the paper).
The state lives in over-allocated storage that grows by ``GROWTH`` so an append does not copy the
whole state; checkpoints hold exactly M rows and loading resizes the layer first;
:func:`estimate_memory` predicts the state of a whole π-MLP after training (spec §1.9).
``reset_parameters`` re-draws a layer's initial state (an infinite layer drops its appended rows).
The π-MLP built from these layers is :class:`manynets.networks.PiMLP`.
"""

from __future__ import annotations

import weakref
from typing import Literal

import torch
from torch import nn

from manynets.cuda_ops.pi_kernel import DEFAULT_CHUNK, pi_backward, pi_forward
from manynets.layers.pi_math import ab_norm

StateDtype = Literal["float32", "bfloat16", "float16"]
STATE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
NORM_EPS = 1e-20
GROWTH = 1.5
_STATE = ("A", "B", "Amult")


def to_state_dtype(name: str) -> torch.dtype:
    """``"float32" | "bfloat16" | "float16"`` -> torch dtype, with a clear error otherwise."""
    if name not in STATE_DTYPES:
        raise ValueError(f"state_dtype={name!r}; expected one of {sorted(STATE_DTYPES)}.")
    return STATE_DTYPES[name]


class PiLinearFunction(torch.autograd.Function):
    """Forward of spec §1.3 and the custom backward of spec §1.4.

    ``apply(g, pi_a, pi_b, A, B, Amult, layernorm, chunk_size)``. ``pi_a`` (b x r_out) and ``pi_b``
    (b x r) are zero dummies that the output does not depend on; their "gradients" are the per-sample
    rows to append: ``pi_a.grad = delta * s`` (s = 1 with layernorm), ``pi_b.grad = gbar``.
    ``g`` gets the true gradient ``(gamma phi'(q)) B + [sum_m gamma psi] g``.
    """

    @staticmethod
    def forward(ctx, g, pi_a, pi_b, A, B, Amult, layernorm: bool, chunk_size: int):
        s = g.norm(dim=1).clamp_min(NORM_EPS)
        gbar = g / s[:, None]
        s_eff = torch.ones_like(s) if layernorm else s
        ctx.save_for_backward(gbar, s, s_eff, A, B, Amult)
        ctx.layernorm, ctx.chunk_size = layernorm, chunk_size
        return pi_forward(gbar, s_eff, A, B, Amult, chunk_size)

    @staticmethod
    def backward(ctx, delta):
        gbar, s, s_eff, A, B, Amult = ctx.saved_tensors
        grad = pi_backward(delta, gbar, A, B, Amult, ctx.chunk_size)
        if ctx.layernorm:  # remove the radial part, then divide by the input norm
            grad = (grad - (grad * gbar).sum(1, keepdim=True) * gbar) / s[:, None]
        grad_g = grad.to(gbar.dtype) if ctx.needs_input_grad[0] else None
        return grad_g, delta * s_eff[:, None], gbar, None, None, None, None, None


class PiInputLayer(nn.Module):
    """``g1 = alpha (x A1 + beta b1)``: A1 (d_in x r) ~ N(0, 1) with unit-norm columns, b1 = 0 (spec §1.2)."""

    def __init__(self, d_in: int, r: int, *, alpha: float = 1.0, bias_alpha: float = 1.0,
                 generator: torch.Generator | None = None) -> None:  # fmt: skip
        super().__init__()
        if d_in < 1 or r < 1:
            raise ValueError(f"PiInputLayer d_in={d_in}, r={r}; expected both >= 1.")
        self.A1 = nn.Parameter(torch.empty(d_in, r))
        self.bias = nn.Parameter(torch.empty(r))
        self.alpha, self.bias_alpha = alpha, bias_alpha
        self.reset_parameters(generator)

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        A1 = torch.randn(self.A1.shape, generator=generator)
        self.A1.copy_(A1 / A1.norm(dim=0, keepdim=True))
        self.bias.zero_()

    def extra_repr(self) -> str:
        return f"d_in={self.A1.shape[0]}, r={self.A1.shape[1]}, alpha={self.alpha}, bias_alpha={self.bias_alpha}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.alpha * (x @ self.A1 + self.bias_alpha * self.bias)


class InfPiLayer(nn.Module):
    """An infinite-width π-layer r_in -> r_out with growing state A, B, Amult (module doc).

    Args:
        r_in, r_out: coefficient dimensions of input and output (r, or d_out for the readout).
        zero_init: A = 0 (the readout of ``pilimit_lib``: output 0 at init); else A ~ N(0, a_std^2).
        a_std: init std of A; default r_in^-1/2 (hidden layers; ``pilimit_orig``'s readout uses 1/r).
        alpha: output multiplier (the readout's alpha_{L+1}; 1 for hidden layers).
        bias_alpha: beta, the bias multiplier.
        layernorm: ``s := 1`` inside the layer (spec §1.3).
        state_dtype: dtype of A and B.
        chunk_size: rows of M per chunk in the kernel.
    """

    def __init__(self, r_in: int, r_out: int, *, zero_init: bool = False, a_std: float | None = None,
                 alpha: float = 1.0, bias_alpha: float = 1.0, layernorm: bool = False,
                 state_dtype: StateDtype = "float32", chunk_size: int = DEFAULT_CHUNK,
                 generator: torch.Generator | None = None) -> None:  # fmt: skip
        super().__init__()
        if r_in < 1 or r_out < 1:
            raise ValueError(f"InfPiLayer r_in={r_in}, r_out={r_out}; expected both >= 1.")
        if chunk_size < 1:
            raise ValueError(f"chunk_size={chunk_size}; expected >= 1 rows.")
        dtype = to_state_dtype(state_dtype)
        self.A = nn.Parameter(torch.empty(r_in, r_out, dtype=dtype), requires_grad=False)
        self.B = nn.Parameter(torch.empty(r_in, r_in, dtype=dtype), requires_grad=False)
        self.Amult = nn.Parameter(torch.empty(r_in), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(r_out))
        self.r_in, self.r_out, self.alpha, self.bias_alpha = r_in, r_out, alpha, bias_alpha
        self.zero_init, self.a_std = zero_init, r_in**-0.5 if a_std is None else a_std
        self.layernorm, self.chunk_size = layernorm, chunk_size
        self._stores: dict[str, torch.Tensor] = {}
        self._pi_a: torch.Tensor | None = None
        self._pi_b: torch.Tensor | None = None
        self._link()
        self.reset_parameters(generator)

    def _link(self) -> None:
        self.Amult.pi_layer = weakref.ref(self)  # PiSGD finds the layer through its Amult

    def __setstate__(self, state) -> None:  # copy.deepcopy and pickling: the copy's Amult points to the copy
        super().__setstate__(state)
        self._stores = {}
        self._link()

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """The initial state (M = r_in rows): B ~ N(0, 1) with unit rows, A ~ N(0, a_std^2) or 0, Amult = 1,
        bias 0 (spec §1.2); rows appended by training are dropped."""
        B = torch.randn(self.r_in, self.r_in, generator=generator)
        B = B / B.norm(dim=1, keepdim=True)
        if self.zero_init:
            A = torch.zeros(self.r_in, self.r_out)
        else:
            A = torch.randn(self.r_in, self.r_out, generator=generator) * self.a_std
        for name, value in (("A", A), ("B", B), ("Amult", torch.ones(self.r_in))):
            param = getattr(self, name)
            param.data = value.to(param.device, param.dtype)
        self._stores = {}
        self.bias.zero_()
        self.zero_pi_grads()

    @property
    def num_rows(self) -> int:
        """M, the number of rows of the state."""
        return self.A.shape[0]

    def extra_repr(self) -> str:
        return (f"r_in={self.r_in}, r_out={self.r_out}, M={self.num_rows}, dtype={self.A.dtype}, "
                f"alpha={self.alpha}, layernorm={self.layernorm}")  # fmt: skip

    def forward(self, g: torch.Tensor) -> torch.Tensor:
        if g.dim() != 2 or g.shape[1] != self.r_in:
            raise ValueError(f"InfPiLayer expects input (batch, {self.r_in}), got {tuple(g.shape)}.")
        if self.training and torch.is_grad_enabled():
            self._pi_a = g.new_zeros(g.shape[0], self.r_out, dtype=torch.float32, requires_grad=True)
            self._pi_b = g.new_zeros(g.shape[0], self.r_in, dtype=torch.float32, requires_grad=True)
            pi_a, pi_b = self._pi_a, self._pi_b
        else:
            pi_a = pi_b = g.new_zeros(())
        out = PiLinearFunction.apply(g, pi_a, pi_b, self.A, self.B, self.Amult, self.layernorm, self.chunk_size)
        out = out + self.bias_alpha * self.bias
        return out if self.alpha == 1.0 else self.alpha * out

    # -- pi-gradients --------------------------------------------------------------
    def pi_grads(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(A-rows = delta * s, B-rows = gbar) of the last backward, or None."""
        if self._pi_a is None or self._pi_a.grad is None:
            return None
        return self._pi_a.grad, self._pi_b.grad

    def pi_grad_norm(self) -> torch.Tensor | None:
        """ABnorm (spec §1.6) of the rows to append."""
        rows = self.pi_grads()
        return None if rows is None else ab_norm(*rows)

    def zero_pi_grads(self) -> None:
        self._pi_a = self._pi_b = None

    # -- growing state -------------------------------------------------------------
    def _store(self, name: str) -> torch.Tensor:
        """The over-allocated tensor whose first M rows are the parameter (re-adopted after .to / load)."""
        param, store = getattr(self, name), self._stores.get(name)
        if store is None or param.data_ptr() != store.data_ptr() or store.dtype != param.dtype or store.device != param.device:
            store = self._stores[name] = param.data
        return store

    @torch.no_grad()
    def append_rows(self, a_rows: torch.Tensor, b_rows: torch.Tensor, amult: float | torch.Tensor) -> None:
        """Append rows ``A += a_rows``, ``B += b_rows``, ``Amult += amult`` (spec §1.5)."""
        k = a_rows.shape[0]
        if a_rows.shape != (k, self.r_out) or b_rows.shape != (k, self.r_in):
            raise ValueError(
                f"append_rows: got A-rows {tuple(a_rows.shape)} and B-rows {tuple(b_rows.shape)}; "
                f"expected ({k}, {self.r_out}) and ({k}, {self.r_in})."
            )
        m = self.num_rows
        new = {"A": a_rows, "B": b_rows, "Amult": torch.as_tensor(amult).expand(k)}
        for name in _STATE:
            param, store = getattr(self, name), self._store(name)
            if m + k > store.shape[0]:
                grown = store.new_empty((max(m + k, int(store.shape[0] * GROWTH)), *store.shape[1:]))
                grown[:m].copy_(store[:m])
                store = self._stores[name] = grown
            store[m : m + k].copy_(new[name])
            param.data = store[: m + k]

    @torch.no_grad()
    def decay(self, factor: float) -> None:
        """Amult *= factor (weight decay of every existing row)."""
        if factor != 1.0:
            self.Amult.mul_(factor)

    @torch.no_grad()
    def resize_rows(self, m: int) -> None:
        """Make the state exactly m rows (new rows uninitialised); used before loading a checkpoint."""
        for name in _STATE:
            param = getattr(self, name)
            if param.shape[0] != m or self._store(name).shape[0] != param.shape[0]:
                param.data = param.data.new_empty((m, *param.shape[1:]))
                self._stores[name] = param.data

    def _compact(self) -> None:
        for name in _STATE:
            param = getattr(self, name)
            if self._store(name).shape[0] != param.shape[0]:
                param.data = param.data.clone()
                self._stores[name] = param.data

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        self._compact()  # a view of a larger storage would save the whole storage
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        saved = state_dict.get(prefix + "A")
        if saved is not None and saved.shape[0] != self.num_rows:
            self.resize_rows(saved.shape[0])
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def pi_layer_rows(state_dict: dict, prefix: str = "") -> dict[str, int]:
    """{layer prefix: M} for every π-layer state in a state dict (keys ending in ``.Amult``)."""
    return {k[: -len("Amult")]: v.shape[0] for k, v in state_dict.items() if k.startswith(prefix) and k.endswith(".Amult")}


def estimate_memory(d_in: int, d_out: int, r: int, depth: int, batch_size: int, steps: int,
                    state_dtype: StateDtype = "float32", chunk_size: int = DEFAULT_CHUNK) -> dict[str, float]:  # fmt: skip
    """Final state size and peak training memory of an infinite π-MLP after ``steps`` steps of ``batch_size``
    (spec §1.9): an input layer d_in -> r, ``depth - 1`` hidden layers r -> r and a readout r -> d_out.

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

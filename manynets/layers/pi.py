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

Storage. ``A`` and ``B`` live in blocks of ``block_size`` rows (all full but the last), which the
chunked kernel walks in place: an append fills the last block and allocates new ones, so growing
never copies the state and holds at most one block more than M rows. ``Amult`` (4 bytes a row, the
parameter through which :class:`~manynets.layers.pi_optim.PiSGD` reaches the layer) is one fp32 tensor
over-allocated by ``GROWTH``. :meth:`InfPiLayer.state_blocks` gives the blocks' rows (views),
:meth:`InfPiLayer.state_tensor` one tensor (a copy). Checkpoints hold A, B and Amult as single tensors
of exactly M rows, as before blocks existed; loading resizes the layer and fills its blocks.
:func:`estimate_memory` predicts the state of a whole π-MLP after training (spec §1.9).
``reset_parameters`` re-draws a layer's initial state (an infinite layer drops its appended rows).
The π-MLP built from these layers is :class:`manynets.networks.PiMLP`.
"""

from __future__ import annotations

import contextlib
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
"""Over-allocation factor of the Amult storage."""
DEFAULT_BLOCK_ROWS = DEFAULT_CHUNK
"""Rows per A/B block: the default chunk, so every chunk is a view into one block. Growing holds at most
one block (0.5 of a block on average) beyond M rows: 12.5 MiB for r = 100 in fp32."""


def to_state_dtype(name: str) -> torch.dtype:
    """``"float32" | "bfloat16" | "float16"`` -> torch dtype, with a clear error otherwise."""
    if name not in STATE_DTYPES:
        raise ValueError(f"state_dtype={name!r}; expected one of {sorted(STATE_DTYPES)}.")
    return STATE_DTYPES[name]


class PiLinearFunction(torch.autograd.Function):
    """Forward of spec §1.3 and the custom backward of spec §1.4.

    ``apply(g, pi_a, pi_b, A, B, Amult, layernorm, chunk_size)`` (A and B tensors or lists of row blocks,
    :mod:`manynets.cuda_ops.pi_kernel`). ``pi_a`` (b x r_out) and ``pi_b``
    (b x r) are zero dummies that the output does not depend on; their "gradients" are the per-sample
    rows to append: ``pi_a.grad = delta * s`` (s = 1 with layernorm), ``pi_b.grad = gbar``.
    ``g`` gets the true gradient ``(gamma phi'(q)) B + [sum_m gamma psi] g``.
    """

    @staticmethod
    def forward(ctx, g, pi_a, pi_b, A, B, Amult, layernorm: bool, chunk_size: int):
        s = g.norm(dim=1).clamp_min(NORM_EPS)
        gbar = g / s[:, None]
        s_eff = torch.ones_like(s) if layernorm else s
        ctx.save_for_backward(gbar, s, s_eff, Amult)
        ctx.blocks, ctx.layernorm, ctx.chunk_size = (A, B), layernorm, chunk_size
        return pi_forward(gbar, s_eff, A, B, Amult, chunk_size)

    @staticmethod
    def backward(ctx, delta):
        gbar, s, s_eff, Amult = ctx.saved_tensors
        grad = pi_backward(delta, gbar, *ctx.blocks, Amult, ctx.chunk_size)
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
        r_in: coefficient dimension of the input (r).
        r_out: coefficient dimension of the output (r, or d_out for the readout).
        zero_init: A = 0 (the readout of ``pilimit_lib``: output 0 at init); else A ~ N(0, a_std^2).
        a_std: init std of A; default r_in^-1/2 (hidden layers; ``pilimit_orig``'s readout uses 1/r).
        alpha: output multiplier (the readout's alpha_{L+1}; 1 for hidden layers).
        bias_alpha: beta, the bias multiplier.
        layernorm: ``s := 1`` inside the layer (spec §1.3).
        state_dtype: dtype of A and B.
        chunk_size: rows of M per chunk in the kernel.
        block_size: rows per block of the A/B storage (module doc).
        generator: random generator of the initial state (None: the global one).
    """

    def __init__(self, r_in: int, r_out: int, *, zero_init: bool = False, a_std: float | None = None,
                 alpha: float = 1.0, bias_alpha: float = 1.0, layernorm: bool = False,
                 state_dtype: StateDtype = "float32", chunk_size: int = DEFAULT_CHUNK,
                 block_size: int = DEFAULT_BLOCK_ROWS, generator: torch.Generator | None = None) -> None:  # fmt: skip
        super().__init__()
        if r_in < 1 or r_out < 1:
            raise ValueError(f"InfPiLayer r_in={r_in}, r_out={r_out}; expected both >= 1.")
        if chunk_size < 1:
            raise ValueError(f"chunk_size={chunk_size}; expected >= 1 rows.")
        if block_size < 1:
            raise ValueError(f"block_size={block_size}; expected >= 1 rows.")
        self._dtype = to_state_dtype(state_dtype)
        self.Amult = nn.Parameter(torch.empty(r_in), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(r_out))
        self.r_in, self.r_out, self.alpha, self.bias_alpha = r_in, r_out, alpha, bias_alpha
        self.zero_init, self.a_std = zero_init, r_in**-0.5 if a_std is None else a_std
        self.layernorm, self.chunk_size, self.block_size = layernorm, chunk_size, block_size
        self._blocks: dict[str, list[torch.Tensor]] = {"A": [], "B": []}
        self._rows = 0
        self._amult_store: torch.Tensor | None = None
        self._meta_state = False
        self._pi_a: torch.Tensor | None = None
        self._pi_b: torch.Tensor | None = None
        self._link()
        self.reset_parameters(generator)

    def _link(self) -> None:
        self.Amult.pi_layer = weakref.ref(self)  # PiSGD finds the layer through its Amult

    def __setstate__(self, state) -> None:  # copy.deepcopy and pickling: the copy's Amult points to the copy
        super().__setstate__(state)
        self._amult_store = None
        self._link()

    def _apply(self, fn, recurse: bool = True):
        """``.to()``, ``.half()``, ``.cuda()``, ...: the A/B blocks follow the registered tensors."""
        super()._apply(fn, recurse)
        self._blocks = {name: [fn(block) for block in blocks] for name, blocks in self._blocks.items()}
        if self._blocks["A"]:
            self._dtype = self._blocks["A"][0].dtype
        return self

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
        self._blocks, self._rows = {"A": [], "B": []}, 0
        self.resize_rows(self.r_in)
        self._write_rows(0, A.to(self._dtype), B.to(self._dtype))
        self.Amult.fill_(1.0)
        self.bias.zero_()
        self.zero_pi_grads()

    @property
    def num_rows(self) -> int:
        """M, the number of rows of the state."""
        return self._rows

    @property
    def state_dtype(self) -> torch.dtype:
        """dtype of A and B."""
        return self._dtype

    def state_blocks(self, name: Literal["A", "B"]) -> list[torch.Tensor]:
        """The filled rows of every block of ``A`` or ``B`` in order (views; together the M rows)."""
        size, m = self.block_size, self._rows
        return [block[: min(size, m - i * size)] for i, block in enumerate(self._blocks[name])]

    def state_tensor(self, name: Literal["A", "B", "Amult"]) -> torch.Tensor:
        """``A`` (M x r_out), ``B`` (M x r_in) as one tensor (a concatenated copy), or ``Amult`` (M)."""
        if name == "Amult":
            return self.Amult.detach().clone()
        width = self.r_out if name == "A" else self.r_in
        blocks = self.state_blocks(name)
        return torch.cat(blocks) if blocks else torch.empty(0, width, dtype=self._dtype, device=self.Amult.device)

    def state_nbytes(self) -> int:
        """Bytes of the M rows of A and B (a checkpoint's share; the storage holds up to one block more)."""
        return self._rows * (self.r_out + self.r_in) * self._dtype.itemsize

    def extra_repr(self) -> str:
        return (f"r_in={self.r_in}, r_out={self.r_out}, M={self.num_rows}, dtype={self._dtype}, "
                f"block_size={self.block_size}, alpha={self.alpha}, layernorm={self.layernorm}")  # fmt: skip

    def forward(self, g: torch.Tensor) -> torch.Tensor:
        if g.dim() != 2 or g.shape[1] != self.r_in:
            raise ValueError(f"InfPiLayer expects input (batch, {self.r_in}), got {tuple(g.shape)}.")
        if self.training and torch.is_grad_enabled():
            self._pi_a = g.new_zeros(g.shape[0], self.r_out, dtype=torch.float32, requires_grad=True)
            self._pi_b = g.new_zeros(g.shape[0], self.r_in, dtype=torch.float32, requires_grad=True)
            pi_a, pi_b = self._pi_a, self._pi_b
        else:
            pi_a = pi_b = g.new_zeros(())
        out = PiLinearFunction.apply(g, pi_a, pi_b, self.state_blocks("A"), self.state_blocks("B"), self.Amult,
                                     self.layernorm, self.chunk_size)  # fmt: skip
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
    def _write_rows(self, lo: int, a_rows: torch.Tensor, b_rows: torch.Tensor) -> None:
        """Copy ``a_rows`` / ``b_rows`` into rows [lo, lo + k) of the (allocated) A/B blocks."""
        size, done = self.block_size, 0
        while done < a_rows.shape[0]:
            i, row = divmod(lo + done, size)
            take = min(a_rows.shape[0] - done, size - row)
            self._blocks["A"][i][row : row + take].copy_(a_rows[done : done + take])
            self._blocks["B"][i][row : row + take].copy_(b_rows[done : done + take])
            done += take

    def _amult(self) -> torch.Tensor:
        """Amult's storage: a tensor whose first M entries are the parameter (re-adopted after .to / load)."""
        store, param = self._amult_store, self.Amult
        if store is None or param.data_ptr() != store.data_ptr() or store.dtype != param.dtype or store.device != param.device:
            store = self._amult_store = param.data
        return store

    @torch.no_grad()
    def append_rows(self, a_rows: torch.Tensor, b_rows: torch.Tensor, amult: float | torch.Tensor) -> None:
        """Append rows ``A += a_rows``, ``B += b_rows``, ``Amult += amult`` (spec §1.5); A/B rows go into the
        last block's free rows and new blocks, Amult grows by ``GROWTH`` when full."""
        k = a_rows.shape[0]
        if a_rows.shape != (k, self.r_out) or b_rows.shape != (k, self.r_in):
            raise ValueError(
                f"append_rows: got A-rows {tuple(a_rows.shape)} and B-rows {tuple(b_rows.shape)}; "
                f"expected ({k}, {self.r_out}) and ({k}, {self.r_in})."
            )
        m, store = self._rows, self._amult()
        if m + k > store.shape[0]:
            grown = store.new_empty(max(m + k, int(store.shape[0] * GROWTH)))
            grown[:m].copy_(store[:m])
            store = self._amult_store = grown
        store[m : m + k].copy_(torch.as_tensor(amult).expand(k))
        self.Amult.data = store[: m + k]
        self._allocate(m + k)
        self._write_rows(m, a_rows, b_rows)
        self._rows = m + k

    def _allocate(self, m: int) -> None:
        """Exactly the blocks that m rows need (new blocks uninitialised; blocks past them freed)."""
        count = -(-m // self.block_size)
        for name, width in (("A", self.r_out), ("B", self.r_in)):
            blocks = self._blocks[name]
            del blocks[count:]
            while len(blocks) < count:
                blocks.append(torch.empty(self.block_size, width, dtype=self._dtype, device=self.Amult.device))

    @torch.no_grad()
    def decay(self, factor: float) -> None:
        """Amult *= factor (weight decay of every existing row)."""
        if factor != 1.0:
            self.Amult.mul_(factor)

    @torch.no_grad()
    def resize_rows(self, m: int) -> None:
        """Make the state exactly m rows (rows past the current M uninitialised; existing blocks are kept, not
        copied); used before loading a checkpoint."""
        self._allocate(m)
        self._rows = m
        if self.Amult.shape[0] != m or self._amult().shape[0] != m:
            self.Amult.data = self.Amult.data.new_empty(m)
            self._amult_store = self.Amult.data

    # -- checkpoints: A and B as one tensor each (the format of unblocked layers) ---
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        for name, width in (("A", self.r_out), ("B", self.r_in)):
            if self._meta_state:
                destination[prefix + name] = torch.empty(self._rows, width, dtype=self._dtype, device="meta")
            else:
                destination[prefix + name] = self.state_tensor(name)
        super()._save_to_state_dict(destination, prefix, keep_vars)
        amult = destination[prefix + "Amult"]
        if not keep_vars and not self._meta_state and amult.untyped_storage().nbytes() > amult.nbytes:
            destination[prefix + "Amult"] = amult.clone()  # a view would save Amult's whole over-allocated storage

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):  # fmt: skip
        keys = {name: prefix + name for name in ("A", "B")}
        saved = {name: state_dict.get(key) for name, key in keys.items()}
        missing_keys.extend(key for name, key in keys.items() if saved[name] is None)
        if all(t is not None for t in saved.values()):
            m = saved["A"].shape[0]
            expected = {"A": (m, self.r_out), "B": (m, self.r_in)}
            bad = [name for name in keys if tuple(saved[name].shape) != expected[name]]
            error_msgs.extend(f"size mismatch for {keys[n]}: copying a param with shape {tuple(saved[n].shape)} from "
                              f"checkpoint, the shape in current model is {expected[n]}." for n in bad)  # fmt: skip
            if not bad:
                with torch.no_grad():
                    if m != self._rows:
                        self.resize_rows(m)
                    self._write_rows(0, saved["A"], saved["B"])
        rest = {k: v for k, v in state_dict.items() if k not in keys.values()}
        super()._load_from_state_dict(rest, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)


@contextlib.contextmanager
def state_shapes_only(module: nn.Module):
    """Within it, ``module.state_dict()`` gives the A/B of its infinite π-layers as meta tensors (shape and
    dtype, no concatenated copy of the blocks): for checks that compare shapes."""
    layers = [m for m in module.modules() if isinstance(m, InfPiLayer)]
    for layer in layers:
        layer._meta_state = True
    try:
        yield
    finally:
        for layer in layers:
            layer._meta_state = False


def pi_layer_rows(state_dict: dict, prefix: str = "") -> dict[str, int]:
    """{layer prefix: M} for every π-layer state in a state dict (keys ending in ``.Amult``)."""
    return {k[: -len("Amult")]: v.shape[0] for k, v in state_dict.items() if k.startswith(prefix) and k.endswith(".Amult")}


def estimate_memory(d_in: int, d_out: int, r: int, depth: int, batch_size: int, steps: int,
                    state_dtype: StateDtype = "float32", chunk_size: int = DEFAULT_CHUNK,
                    block_size: int = DEFAULT_BLOCK_ROWS) -> dict[str, float]:  # fmt: skip
    """Final state size and peak training memory of an infinite π-MLP after ``steps`` steps of ``batch_size``
    (spec §1.9): an input layer d_in -> r, ``depth - 1`` hidden layers r -> r and a readout r -> d_out.

    Each infinite layer ends with M = r + batch_size * steps rows of A (r_out), B (r) in ``state_dtype``
    and Amult in fp32. A/B storage is M rows rounded up to whole blocks of ``block_size`` rows; Amult's
    is over-allocated by up to ``GROWTH`` and growing it briefly holds the old and the new one; the kernel
    adds a few (batch x chunk) fp32 matrices (and a chunk of A/B cast to fp32 when stored in 16 bits, or
    copied where a chunk crosses a block border). Returns ``rows`` (M), ``state`` (bytes of a checkpoint's
    tensors) and ``peak`` (upper bound of the bytes held during training, excluding activations of the input
    layer; saving a checkpoint adds one concatenated copy of the state).
    """
    item = to_state_dtype(state_dtype).itemsize
    m = r + batch_size * steps
    r_outs = [r] * (depth - 1) + [d_out]
    inputs = 4 * (d_in * r + r)
    state = sum(m * (r_out + r) * item + 4 * m + 4 * r_out for r_out in r_outs) + inputs
    blocks = -(-m // block_size) * block_size
    storage = sum(blocks * (r_out + r) * item + GROWTH * 4 * m + 4 * r_out for r_out in r_outs)
    chunk = min(chunk_size, m)
    work = 6 * 4 * batch_size * chunk + 2 * 4 * chunk * (r + max(r_outs))
    return {"rows": m, "state": state, "peak": storage + 4 * m + inputs + work}

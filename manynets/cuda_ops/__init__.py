"""Custom operators: a torch reference for each op (runs anywhere, differentiable) and, where it pays, a
fused GPU kernel (ARCHITECTURE.md, layout).

What runs where today:

- ``binding.hrr_bind_bundle`` (superposition: bind each slot of maps (G, n, C, H, W) or vectors (G, n, C)
  with its key and sum): a ``torch.library`` custom op ``manynets::hrr_bind_bundle`` with a fake (meta)
  implementation and an autograd formula, called as the op in eager mode too, so ``torch.compile`` traces
  it as one node. Its implementation is PyTorch code (real FFTs, or one GEMM with circulant matrices
  for small channel counts) and runs on the device of its inputs.
- ``pi_kernel.pi_forward`` / ``pi_backward`` (the infinite π-layer, streamed over the M state rows in
  chunks): PyTorch code on the device of the state. They are also registered as ``torch.library``
  custom ops ``manynets::pi_forward`` / ``manynets::pi_backward`` with fake implementations; the op is
  used only while ``torch.compile`` traces, eager calls go to the chunked functions directly (the op's
  dispatch costs about a millisecond per call on a CPU). ``pi_forward_reference`` is the unchunked formula.
- ``pi_math``: the closed forms (phi, phi', psi) the π kernel evaluates.

No fused Triton or CUDA kernel ships: on a GPU every op runs as PyTorch's own kernels, as on a CPU.
This package imports nothing else of ``manynets`` (it is the bottom of the import direction
``cli -> lightning_modules / callbacks -> analysis -> networks -> layers -> cuda_ops``).
"""

"""One forward-hook tap on named layers, used by saturation, probes, PCA projections and receptive fields.

Nothing in the network changes: forward hooks see every output of the chosen modules; the tap removes
its hooks on :meth:`LayerTap.remove` or at the end of a ``with`` block.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

OnOutput = Callable[[str, torch.Tensor], "torch.Tensor | None"]


class LayerTap:
    """Forward hooks on ``modules`` (name -> module).

    Without ``on_output`` every forward stores the detached output in ``outputs[name]`` (the last call
    wins). With ``on_output(name, output)`` the output is handed to it instead; a tensor it returns
    replaces the module's output (as a PCA projection does), ``None`` leaves the output alone.
    Non-tensor outputs are skipped.
    """

    def __init__(self, modules: dict[str, nn.Module], on_output: OnOutput | None = None) -> None:
        self.modules = dict(modules)
        self.on_output = on_output
        self.outputs: dict[str, torch.Tensor] = {}
        self.handles = [module.register_forward_hook(self._hook(name)) for name, module in self.modules.items()]

    def _hook(self, name: str):
        def hook(module: nn.Module, inputs, output):
            if not torch.is_tensor(output):
                return None
            if self.on_output is None:
                self.outputs[name] = output.detach()
                return None
            return self.on_output(name, output)

        return hook

    def remove(self) -> None:
        """Remove every hook (idempotent) and drop the stored outputs."""
        for handle in self.handles:
            handle.remove()
        self.handles = []
        self.outputs = {}

    def __enter__(self) -> "LayerTap":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

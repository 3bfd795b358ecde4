"""π-SGD and the π-net gradient clipping (spec pinet_saturation §1.5, §1.6).

:class:`PiSGD` is one optimizer for the whole π-net (official ``PiSGD`` of ``pilimit_lib/inf/optim.py``):

- a π-layer, entered through its ``Amult`` parameter: ``Amult <- Amult (1 - lr wd)``, then the rows of
  the last backward are appended (A-rows ``delta s``, B-rows ``gbar``, Amult ``-lr``); old A/B rows never change;
- every other parameter (input layer ``A1``, biases, all weights of the finite twin): vanilla SGD,
  ``p <- p - lr (grad + wd p)`` (momentum 0; the official library offers only vanilla SGD).

Per-group ``lr_mult`` / ``wd_mult`` keys scale the group's ``lr`` / ``weight_decay`` (first-, last-layer
and bias multipliers of the paper; with ``apply_lr_mult_to_wd=False`` the module sets ``wd_mult = 1/lr_mult``
so every decay factor is ``1 - lr wd``). Schedulers change ``lr`` as usual.

:func:`clip_gradients` scales gradients before the step: π-layers by the A/B norm of the appended block
(only the A-rows are scaled; B-rows and Amult untouched), other tensors by their usual norm; per tensor
(``per_param=True``, coefficient ``min(1, clip / (norm + 1e-6))`` each) or by the global norm.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn
from torch.optim import Optimizer

from manynets.layers.pi import InfPiLayer


def _owner(param: torch.Tensor) -> InfPiLayer | None:
    ref = getattr(param, "pi_layer", None)
    return ref() if ref is not None else None


class PiSGD(Optimizer):
    """SGD that appends rows to π-layers and updates ordinary parameters by vanilla SGD (module doc).

    Args:
        params: parameters or groups; a π-layer is given by its ``Amult`` parameter. Group keys
            ``lr_mult`` and ``wd_mult`` (default 1) scale ``lr`` and ``weight_decay``.
        lr: learning rate.
        weight_decay: L2 weight decay (decay of Amult for π-layers).
    """

    def __init__(self, params: Iterable, lr: float = 1.0, weight_decay: float = 0.0) -> None:
        if lr < 0 or weight_decay < 0:
            raise ValueError(f"PiSGD lr={lr}, weight_decay={weight_decay}; expected both >= 0.")
        super().__init__(params, {"lr": lr, "weight_decay": weight_decay, "lr_mult": 1.0, "wd_mult": 1.0})
        for group in self.param_groups:
            for p in group["params"]:
                if not p.requires_grad and _owner(p) is None:
                    raise ValueError(
                        f"PiSGD got a parameter of shape {tuple(p.shape)} that needs no gradient and is not the "
                        "Amult of an InfPiLayer; pass only trainable parameters and π-layer Amults."
                    )

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr = group["lr"] * group["lr_mult"]
            wd = group["weight_decay"] * group["wd_mult"]
            for p in group["params"]:
                layer = _owner(p)
                if layer is not None:
                    rows = layer.pi_grads()
                    if rows is None:
                        continue
                    layer.decay(1.0 - lr * wd)
                    layer.append_rows(rows[0], rows[1], -lr)
                    layer.zero_pi_grads()
                elif p.grad is not None:
                    d = p.grad.add(p, alpha=wd) if wd else p.grad
                    p.add_(d, alpha=-lr)
        return loss


def gradient_norms(model: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """[(tensor to scale, its norm)]: A-rows of every π-layer with ABnorm, every other grad with its L2 norm."""
    out, pi_state = [], set()
    for module in model.modules():
        if isinstance(module, InfPiLayer):
            pi_state.add(id(module.Amult))  # A/B are not parameters (blocks, manynets.layers.pi)
            rows = module.pi_grads()
            if rows is not None:
                out.append((rows[0], module.pi_grad_norm()))
    for p in model.parameters():
        if id(p) not in pi_state and p.grad is not None:
            out.append((p.grad, p.grad.norm()))
    return out


@torch.no_grad()
def clip_gradients(model: nn.Module, clip: float, per_param: bool = False) -> torch.Tensor:
    """Clip in place (module doc); returns the global norm before clipping. ``clip <= 0`` only measures."""
    grads = gradient_norms(model)
    if not grads:
        return torch.zeros(())
    norms = torch.stack([n.float() for _, n in grads])
    total = norms.square().sum().sqrt()
    if clip > 0:
        if per_param:
            coefs = (clip / (norms + 1e-6)).clamp(max=1.0)
        else:
            coefs = (clip / (total + 1e-6)).clamp(max=1.0).expand(len(grads))
        for (grad, _), coef in zip(grads, coefs):
            grad.mul_(coef.to(grad.dtype))
    return total

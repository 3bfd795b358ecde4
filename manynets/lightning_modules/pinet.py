"""π-nets: infinite-width feature-learning MLPs and their finite twins (Yang, Santacroce & Hu, ICLR 2022).

Spec pinet_saturation Part 1; official code ``santacml/pilim`` (paper numbers from ``pilimit_orig``).
The network is an MLP on flattened images built here (``width: 0`` -> :class:`~manynets.layers.pi_mlp.InfMLP`,
``width: n`` -> :class:`~manynets.layers.pi_finite.FinPiMLP`); it does not use the conv backbones, so
``backbone`` must stay unset (the base class receives a factory of the π-MLP). ``image_shape`` gives
d_in = C*H*W and ``num_classes`` d_out, linked from the data by the CLI.

**depth** counts hidden layers as the paper and ``pilimit_orig`` (``--depth 2`` = ``depth: 2``);
``pilimit_lib``'s ``--depth k`` is ``depth: k + 1`` (spec §1.2).

Training uses manual optimisation with :class:`~manynets.layers.pi_optim.PiSGD` (one step per batch):
backward -> (finite: project gradients) -> clip -> append rows / SGD -> scheduler. Parameter groups
(``--no-apply-lr-mult-to-wd`` = ``apply_lr_mult_to_wd: false``): input layer ``lr * first_layer_lr_mult``,
biases ``lr * bias_lr_mult``, hidden layers ``lr``, readout ``lr * last_layer_lr_mult``.
Gradient clipping (spec §1.6): π-layers by the A/B norm, per tensor or global; with
``gclip_follows_lr`` (default, ``pilimit_orig`` and the paper) the clip value is multiplied by the
current/initial learning-rate ratio, so it drops with the lr at the milestones (``pilimit_lib`` keeps
it constant: ``gclip_follows_lr: false``). Schedulers step per batch or per epoch as configured
(MultiStepLR with milestones in epochs at ``scheduler_interval: epoch`` = the paper's per-batch
milestones ``epochs * len(loader)``).

Checkpoints hold the grown state exactly; loading (``--ckpt_path``) resizes every π-layer first.
Before training the module logs the estimated final state and peak memory (spec §1.9).
"""

from __future__ import annotations

import functools
from typing import Any, Literal

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_info

from manynets.cuda_ops.pi_kernel import DEFAULT_CHUNK
from manynets.errors import ConfigError, check_arg
from manynets.layers.pi import InfPiLayer, StateDtype, pi_layer_rows
from manynets.layers.pi_finite import FinPiMLP
from manynets.layers.pi_mlp import InfMLP, estimate_memory
from manynets.layers.pi_optim import PiSGD, clip_gradients
from manynets.lightning_modules.classifier import BackboneFactory, ClassifierModule, _factory_target


def build_pi_mlp(num_classes: int, image_shape: tuple[int, int, int], *, width: int = 0, gaussian_init: bool = False,
                 gproj: bool = True, **kwargs: Any) -> InfMLP | FinPiMLP:  # fmt: skip
    """The π-net for ``(num_classes, image_shape)``: InfMLP for width 0, else its finite twin."""
    d_in = 1
    for size in image_shape:
        d_in *= int(size)
    if width < 0:
        raise ConfigError(f"model.init_args.width = {width}: expected 0 (infinite π-net) or the finite width n >= 1.")
    if width == 0:
        return InfMLP(d_in, num_classes, **kwargs)
    kwargs = {k: v for k, v in kwargs.items() if k not in ("readout_zero_init", "state_dtype", "chunk_size")}
    return FinPiMLP(d_in, num_classes, width=width, gaussian_init=gaussian_init, gproj=gproj, **kwargs)


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}"
        n /= 1024


class PiNetModule(ClassifierModule):
    """π-net classifier (module doc). Defaults are ``cifar10mlp``'s (spec §1.11) except where noted.

    Args:
        r: rank of the π-limit.
        depth: hidden layers (orig/paper convention; lib ``--depth k`` = ``k + 1``).
        width: 0 = infinite π-net; n >= 1 = finite π-net (or μ-net with ``gaussian_init``) of width n.
        first_layer_alpha, last_layer_alpha, bias_alpha, last_bias_alpha: multipliers (spec §1.3).
        first_layer_lr_mult, last_layer_lr_mult, bias_lr_mult: learning-rate multipliers per group.
        apply_lr_mult_to_wd: False divides each group's weight decay by its lr multiplier (decay 1 - lr wd).
        gclip: gradient clipping value (0: off); gclip_per_param: clip each tensor separately.
        gclip_follows_lr: scale gclip by the lr ratio (paper / orig) instead of keeping it constant (lib).
        layernorm: π-layer option of spec §1.3 (not used in the paper).
        readout_zero_init: readout A = 0 (lib; output 0 at init) or N(0, 1) / r (orig).
        state_dtype: dtype of A and B (the paper: float16 on GPU). Amult is always fp32.
        chunk_size: rows of M per kernel chunk (memory = state + O(batch x chunk)).
        gaussian_init, gproj: finite nets only; μ-net = ``gaussian_init: true, gproj: false``.
        loss: ``xent`` or ``mse`` (one-hot minus 0.1 targets, as cifar10mlp).
        init_seed: seed of the initial π-state / Omega (None: from the global seed).
        backbone: must be None (the π-net builds its own MLP).
        optimizer: must be :class:`~manynets.layers.pi_optim.PiSGD` (lr, weight_decay).
        Other arguments: see :class:`ClassifierModule`.
    """

    def __init__(
        self,
        backbone: BackboneFactory | None = None,
        num_classes: int = 10,
        image_shape: tuple[int, int, int] = (3, 32, 32),
        optimizer: OptimizerCallable = functools.partial(PiSGD, lr=2.0, weight_decay=1e-4),
        lr_scheduler: LRSchedulerCallable | None = None,
        scheduler_interval: Literal["step", "epoch"] | None = None,
        r: int = 200,
        depth: int = 2,
        width: int = 0,
        first_layer_alpha: float = 1.0,
        last_layer_alpha: float = 1.0,
        bias_alpha: float = 1.0,
        last_bias_alpha: float | None = None,
        first_layer_lr_mult: float = 0.1,
        last_layer_lr_mult: float = 1.0,
        bias_lr_mult: float = 0.5,
        apply_lr_mult_to_wd: bool = True,
        gclip: float = 0.2,
        gclip_per_param: bool = False,
        gclip_follows_lr: bool = True,
        layernorm: bool = False,
        readout_zero_init: bool = True,
        state_dtype: StateDtype = "float32",
        chunk_size: int = DEFAULT_CHUNK,
        gaussian_init: bool = False,
        gproj: bool = True,
        loss: Literal["xent", "mse"] = "xent",
        init_seed: int | None = None,
    ) -> None:
        m = "model.init_args."
        check_arg(backbone is None, m + "backbone", backbone, "unset: PiNetModule builds its own π-MLP on flattened "
                  "images, so remove model.init_args.backbone", "Set r, depth and width on the model instead.")
        check_arg(width >= 0, m + "width", width, "0 (infinite π-net) or the finite width n >= 1")
        check_arg(r >= 1, m + "r", r, ">= 1 (rank of the π-limit)", "The paper uses r = 200.")
        check_arg(depth >= 1, m + "depth", depth, ">= 1 hidden layers", "pilimit_lib's --depth k is depth: k + 1.")
        check_arg(chunk_size >= 1, m + "chunk_size", chunk_size, ">= 1 rows per kernel chunk")
        check_arg(gclip >= 0, m + "gclip", gclip, ">= 0", "0 turns gradient clipping off.")
        for name, mult in (("first_layer_lr_mult", first_layer_lr_mult), ("last_layer_lr_mult", last_layer_lr_mult),
                           ("bias_lr_mult", bias_lr_mult)):  # fmt: skip
            check_arg(mult >= 0, m + name, mult, ">= 0", "0 freezes the group.")
        target = _factory_target(optimizer)
        check_arg(target is not None and issubclass(target, PiSGD), m + "optimizer",
                  getattr(target, "__name__", optimizer), "manynets.layers.pi_optim.PiSGD (it appends rows to the "
                  "π-layers)", "Set model.init_args.optimizer.class_path: manynets.layers.pi_optim.PiSGD.")
        factory = functools.partial(
            build_pi_mlp, width=width, gaussian_init=gaussian_init, gproj=gproj, r=r, depth=depth,
            first_layer_alpha=first_layer_alpha, last_layer_alpha=last_layer_alpha, bias_alpha=bias_alpha,
            last_bias_alpha=last_bias_alpha, layernorm=layernorm, readout_zero_init=readout_zero_init,
            state_dtype=state_dtype, chunk_size=chunk_size, seed=init_seed,
        )  # fmt: skip
        super().__init__(factory, num_classes, image_shape, optimizer, lr_scheduler, scheduler_interval)
        self.automatic_optimization = False
        self._initial_lr: float | None = None

    # -- groups and optimizer ------------------------------------------------------
    def parameter_groups(self) -> list[dict[str, Any]]:
        """Groups with ``lr_mult`` / ``wd_mult``: first layer, biases, hidden π-layers, readout (module doc)."""
        h, net = self.hparams, self.network
        if isinstance(net, InfMLP):
            first, hidden, last = [net.input.A1], [l.Amult for l in net.hidden], [net.output.Amult]
            biases = [net.input.bias] + [l.bias for l in net.pi_layers()]
        else:
            lins = net.linears
            first, hidden, last = [lins[0].weight], [l.weight for l in lins[1:-1]], [lins[-1].weight]
            biases = [l.bias for l in lins]
        groups = []
        for params, mult in ((first, h.first_layer_lr_mult), (biases, h.bias_lr_mult), (hidden, 1.0),
                             (last, h.last_layer_lr_mult)):  # fmt: skip
            if params:
                wd_mult = 1.0 if h.apply_lr_mult_to_wd or mult == 0 else 1.0 / mult
                groups.append({"params": params, "lr_mult": mult, "wd_mult": wd_mult})
        return groups

    # -- training ------------------------------------------------------------------
    def training_loss(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self(images)
        if self.hparams.loss == "mse":
            target = F.one_hot(labels, self.num_classes).to(logits.dtype) - 0.1
            return F.mse_loss(logits, target, reduction="sum") / logits.shape[0], logits
        return F.cross_entropy(logits, labels), logits

    def current_gclip(self) -> float:
        """gclip, scaled by the lr ratio of the hidden group when ``gclip_follows_lr``."""
        clip = self.hparams.gclip
        if clip <= 0 or not self.hparams.gclip_follows_lr:
            return clip
        group = self.optimizers().optimizer.param_groups[0]
        initial = group.get("initial_lr", self._initial_lr or group["lr"])
        return clip * group["lr"] / initial if initial else clip

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        images, labels = batch
        opt = self.optimizers()
        if self._initial_lr is None:
            self._initial_lr = opt.optimizer.param_groups[0]["lr"]
        opt.zero_grad(set_to_none=True)
        loss, logits = self.training_loss(images, labels)
        self.check_finite(loss)
        self.manual_backward(loss)
        if isinstance(self.network, FinPiMLP):
            self.network.project_gradients()
        norm = clip_gradients(self.network, self.current_gclip(), self.hparams.gclip_per_param)
        opt.step()
        scheduler = self.lr_schedulers()
        if scheduler is not None and self.trainer.lr_scheduler_configs[0].interval == "step":
            scheduler.step()
        self.train_acc(logits.detach(), labels)
        self.log("train/loss", loss.detach(), prog_bar=True)
        self.log("train/acc", self.train_acc, on_step=False, on_epoch=True)
        self.log("train/grad_norm", norm)
        if isinstance(self.network, InfMLP):
            self.log("pi/rows", float(self.network.output.num_rows))
        return loss.detach()

    def on_train_epoch_end(self) -> None:
        scheduler = self.lr_schedulers()
        if scheduler is not None and self.trainer.lr_scheduler_configs[0].interval == "epoch":
            scheduler.step()

    def on_fit_start(self) -> None:
        """Log the estimated final state and peak memory for the configured run (spec §1.9)."""
        net = self.network
        if not isinstance(net, InfMLP):
            return
        steps = self.trainer.estimated_stepping_batches
        batch = getattr(self.trainer.datamodule, "batch_size", None) if self.trainer.datamodule else None
        if batch is None or steps is None or steps == float("inf"):
            rank_zero_info("π-net: cannot estimate the final state size (unknown batch size or number of steps).")
            return
        steps = int(steps)
        est = estimate_memory(net.d_in, net.d_out, net.r, net.depth, batch, steps, self.hparams.state_dtype,
                              self.hparams.chunk_size)  # fmt: skip
        rank_zero_info(
            f"π-net: after {steps} steps of batch {batch} every infinite layer holds M = {est['rows']:,} rows "
            f"(r={net.r}, depth={net.depth}, A/B in {self.hparams.state_dtype}): final state "
            f"{_fmt_bytes(est['state'])}, peak training memory up to {_fmt_bytes(est['peak'])}."
        )

    # -- checkpoints ---------------------------------------------------------------
    def _resize_to(self, state_dict: dict[str, torch.Tensor]) -> None:
        rows = pi_layer_rows(state_dict)
        for name, module in self.named_modules():
            if isinstance(module, InfPiLayer) and f"{name}." in rows:
                module.resize_rows(rows[f"{name}."])

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Resize every π-layer to the checkpoint's M, then the base class checks the shapes."""
        self._resize_to(checkpoint.get("state_dict", {}))
        super().on_load_checkpoint(checkpoint)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        self._resize_to(state_dict)
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

"""Every image of an evaluation set is scored, once, by every method (validate and test).

Each method runs ``trainer.validate`` and ``trainer.test`` on an in-memory set whose last batch is
partial (23 images in batches of 7: last batch 2; 22 in batches of 7: last batch 1). A callback reads
the torchmetrics states at the epoch end, before they are reset (accuracy tp + fn, NLL / Brier
``count``, ECE's stored confidences, probe ``total``, disagreement ``count`` per member pair): every
evaluation metric must have seen exactly the set. Each accuracy's tp and NLL's sum must equal an
independent computation on the method's evaluation logits computed image by image (superposition:
group by group, the last partial group of a batch padded with copies of the batch's first images, as
documented in :func:`manynets.lightning_modules.superposition.pad_to_groups`).
"""

from __future__ import annotations

import functools
import math

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics import Metric
from torchmetrics.classification import MulticlassAccuracy, MulticlassCalibrationError

from manynets.layers.pi_optim import PiSGD
from manynets.layers.probes import ProbeAccuracy
from manynets.lightning_modules import (
    CheckpointEnsembleModule,
    ClassifierModule,
    MixMoModule,
    SubspaceModule,
    SuperpositionModule,
)
from manynets.lightning_modules.pinet import PiNetModule
from manynets.lightning_modules.probe import ProbeModule
from manynets.metrics import BrierScore, Disagreement, NegativeLogLikelihood, RatioErrors
from manynets.networks import CifarResNet, PiMLP, WideResNet

pytestmark = pytest.mark.usefixtures("one_thread")

SHAPE = (3, 8, 8)
CLASSES = 5
BATCH = 7
SIZES = (23, 22)  # last batch of 2 images; last batch of 1 image
WRN = functools.partial(WideResNet, depth=10, width=1, initial_width=1, activation="prelu", stem_norm_act=True,
                        shortcut_norm=True, final_norm_act=False)  # fmt: skip
RESNET = functools.partial(CifarResNet, depth=8, width=4)


class InMemoryData(pl.LightningDataModule):
    """``size`` random images as both validation and test set, unshuffled batches of ``BATCH``."""

    def __init__(self, size: int) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(size)
        self.images = torch.randn(size, *SHAPE, generator=g)
        self.labels = torch.randint(CLASSES, (size,), generator=g)
        self.size = size

    def train_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(self.images, self.labels), batch_size=8, shuffle=True, drop_last=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(self.images, self.labels), batch_size=BATCH)

    test_dataloader = val_dataloader


class ScoredCounts(pl.Callback):
    """Images seen by every evaluation metric of the module, read at the epoch end (before the reset)."""

    def __init__(self) -> None:
        self.counts: dict[str, dict[str, int]] = {}
        self.correct: dict[str, dict[str, int]] = {}
        self.nll: dict[str, dict[str, float]] = {}

    def _read(self, module: pl.LightningModule, stage: str) -> None:
        counts, correct, nll = {}, {}, {}
        for name, metric in module.named_modules():
            if not isinstance(metric, Metric) or not _belongs(name, stage):
                continue
            counts[name] = _seen(metric)
            if isinstance(metric, MulticlassAccuracy):
                correct[name] = int(metric.tp.sum())
            if isinstance(metric, NegativeLogLikelihood):
                nll[name] = float(metric.total)
        self.counts[stage], self.correct[stage], self.nll[stage] = counts, correct, nll

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        self._read(pl_module, "val")

    def on_test_epoch_end(self, trainer, pl_module) -> None:
        self._read(pl_module, "test")


def _belongs(name: str, stage: str) -> bool:
    if stage == "val":
        return name.startswith("val_") or name.endswith(".val_acc")
    return name.startswith(("test_", "ts_metrics", "ratio_errors")) or name.endswith(".test_acc")


def _seen(metric: Metric) -> int | None:
    """Number of images a metric has been updated with (per member pair for Disagreement)."""
    if isinstance(metric, MulticlassAccuracy):
        return int((metric.tp + metric.fn).sum())
    if isinstance(metric, (NegativeLogLikelihood, BrierScore, Disagreement)):
        return int(metric.count)
    if isinstance(metric, MulticlassCalibrationError):
        return sum(len(c) for c in metric.confidences) if isinstance(metric.confidences, list) else len(metric.confidences)
    if isinstance(metric, ProbeAccuracy):
        return int(metric.total)
    if isinstance(metric, RatioErrors):
        return None  # pair error counts only; no image count to read
    raise AssertionError(f"unknown evaluation metric {type(metric).__name__}: teach _seen to count its images")


# -- independent predictions ---------------------------------------------------------------
@torch.no_grad()
def image_by_image(module: pl.LightningModule, data: InMemoryData) -> torch.Tensor:
    """Evaluation logits (M, size, C) of the method, one image at a time (M = 1 for a single network)."""
    module.eval()
    rows = []
    for i in range(data.size):
        logits = module.predict_logits(data.images[i : i + 1])
        rows.append(logits if logits.dim() == 3 else logits[None])
    return torch.cat(rows, dim=1)


@torch.no_grad()
def superposed_group_by_group(module: SuperpositionModule, data: InMemoryData, n: int) -> torch.Tensor:
    """Logits (size, C) at n: each group of n consecutive images of a loader batch superposed alone; a partial
    last group is completed with copies of the batch's first images (cycling when the batch has < n images)."""
    module.eval()
    out = []
    for start in range(0, data.size, BATCH):
        batch = torch.arange(start, min(start + BATCH, data.size))
        for lo in range(0, len(batch), n):
            group = batch[lo : lo + n]
            missing = n - len(group)
            full = torch.cat([group, batch[torch.arange(missing) % len(batch)]])
            out.append(module.forward_superposed(data.images[full], n)[: len(group)])
    return torch.cat(out)


def correct(logits: torch.Tensor, labels: torch.Tensor) -> int:
    return int((logits.argmax(-1) == labels).sum())


# -- modules ---------------------------------------------------------------------------------
def _ensemble(tmp_path_factory) -> CheckpointEnsembleModule:
    directory = tmp_path_factory.mktemp("members")
    paths = []
    for k in range(2):
        net = RESNET(CLASSES, SHAPE)
        paths.append(str(directory / f"m{k}.ckpt"))
        torch.save({"state_dict": {f"network.{n}": v for n, v in net.state_dict().items()}}, paths[-1])
    return CheckpointEnsembleModule(RESNET, CLASSES, SHAPE, checkpoints=paths)


BUILDERS = {
    "plain": lambda _: ClassifierModule(RESNET, CLASSES, SHAPE),
    "superposition_N2": lambda _: SuperpositionModule(WRN, CLASSES, SHAPE, capacity=2),
    "superposition_N4": lambda _: SuperpositionModule(WRN, CLASSES, SHAPE, capacity=4),
    "mixmo": lambda _: MixMoModule(RESNET, CLASSES, SHAPE, num_members=2, temperature_scaling="val"),
    "subspace": lambda _: SubspaceModule(RESNET, CLASSES, SHAPE, kind="line", test_recompute_bn=False),
    "ensemble": _ensemble,
    "probe": lambda f: ProbeModule(backbone=RESNET, num_classes=CLASSES, image_shape=SHAPE, layers="stem|head",
                                   dirpath=str(f.mktemp("probe"))),  # fmt: skip
    "pinet": lambda _: PiNetModule(functools.partial(PiMLP, r=6, depth=2, seed=0), CLASSES, SHAPE,
                                   optimizer=functools.partial(PiSGD, lr=0.5)),  # fmt: skip
}


@pytest.fixture(scope="module")
def data() -> dict[int, InMemoryData]:
    return {size: InMemoryData(size) for size in SIZES}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data):
    """method -> size -> run: each method validated and tested on each set (one module per method)."""
    results = {}
    for method, build in BUILDERS.items():
        torch.manual_seed(0)
        module = build(tmp_path_factory)
        results[method] = {}
        for size, dm in data.items():
            counter = ScoredCounts()
            trainer = pl.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False,
                                 enable_checkpointing=False, accelerator="cpu", devices=1, callbacks=[counter])  # fmt: skip
            trainer.validate(module, datamodule=dm, verbose=False)
            trainer.test(module, datamodule=dm, verbose=False)
            results[method][size] = {
                "module": module, "counts": counter.counts, "hits": counter.correct, "nll": counter.nll,
                "throughput": {n: c for n, (c, _) in getattr(module, "_throughput", {}).items()},
                "temperature": getattr(module, "temperature", 1.0),
            }  # fmt: skip
    return results


def _members(module) -> int:
    return getattr(module, "num_members", None) or len(getattr(module, "members", [])) or 1


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("method", list(BUILDERS))
def test_every_metric_sees_every_image_once(runs, method, size):
    run = runs[method][size]
    module, counts, throughput = run["module"], run["counts"], run["throughput"]
    pairs = math.comb(_members(module), 2)
    for stage in ("val", "test"):
        assert counts[stage], f"{method}: no {stage} metric found"
        wrong = {name: seen for name, seen in counts[stage].items()
                 if seen is not None and seen != (size * pairs if "disagreement" in name else size)}  # fmt: skip
        assert not wrong, f"{method}, {size} images: {stage} metrics scored {wrong}"
    for n, seen in throughput.items():
        assert seen == size, f"{method}: images/s at n={n} counted {seen} of {size} images"


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("method", list(BUILDERS))
def test_accuracy_and_nll_equal_an_independent_computation(runs, data, method, size):
    """tp of every accuracy = argmax hits, and the NLL sum = summed cross-entropy, of logits computed
    image by image (superposition: group by group with the documented padding)."""
    run = runs[method][size]
    module = run["module"]
    dm = data[size]
    if isinstance(module, SuperpositionModule):
        variants = {}
        for n in module.eval_n:
            logits = superposed_group_by_group(module, dm, n)
            variants[f"val_variant_metrics.v_n{n}"] = variants[f"test_variant_metrics.0.v_n{n}.ensemble"] = logits
            if n == module.capacity:
                variants["val_metrics"] = variants["test_metrics.0.ensemble"] = logits
        assert len(variants) == 2 * len(module.eval_n) + 2
        members = None
    else:
        members = image_by_image(module, dm)
        variants = {"val_metrics": members.mean(0), "test_metrics.0.ensemble": members.mean(0)}
        if isinstance(module, MixMoModule):  # the temperature-scaled variant "ts", at test time only
            variants["test_variant_metrics.0.v_ts.ensemble"] = members.mean(0) / run["temperature"]
    expected_hits = {f"{k}.acc": correct(v, dm.labels) for k, v in variants.items()}
    if members is not None and members.shape[0] > 1:
        expected_hits.update({f"test_metrics.0.members.{k}": correct(m, dm.labels) for k, m in enumerate(members)})
    hits = {**run["hits"]["val"], **run["hits"]["test"]}
    assert {k: hits.get(k) for k in expected_hits} == expected_hits
    summed = {**run["nll"]["val"], **run["nll"]["test"]}
    for key, logits in variants.items():
        reference = F.cross_entropy(logits.double(), dm.labels, reduction="sum").item()
        assert summed[f"{key}.nll"] == pytest.approx(reference, rel=1e-5), key


def test_superposition_eval_n_cover_every_divisor(runs):
    assert runs["superposition_N2"][SIZES[0]]["module"].eval_n == [1, 2]
    assert runs["superposition_N4"][SIZES[0]]["module"].eval_n == [1, 2, 4]


def test_a_method_that_drops_images_fails_loudly():
    class Dropping(ClassifierModule):
        def predict_logits(self, images):
            return super().predict_logits(images)[:-1]

    module = Dropping(RESNET, CLASSES, SHAPE).eval()
    with pytest.raises(RuntimeError, match=r"6 rows of evaluation logits \(variant '', shape \(6, 5\)\) for a batch"):
        module.validation_step((torch.randn(7, *SHAPE), torch.randint(CLASSES, (7,))), 0)


@pytest.mark.filterwarnings("ignore:You are trying to `self.log")
def test_training_still_truncates_to_whole_groups():
    """Training keeps the official truncation: a batch of 7 at n = 2 trains on 6 images."""
    module = SuperpositionModule(WRN, CLASSES, SHAPE, capacity=2, mixup_alpha=0.0).train()
    labels = torch.randint(CLASSES, (7,))
    loss, logits, targets = module.training_loss(torch.randn(7, *SHAPE), labels)
    assert logits.shape == (6, CLASSES) and torch.isfinite(loss) and torch.equal(targets, labels[:6])

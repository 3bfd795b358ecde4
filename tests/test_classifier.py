"""ClassifierModule and metrics against independent computations."""

from functools import partial

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from manynets.lightning_modules.classifier import ClassifierModule, _factory_target, classification_metrics
from manynets.metrics import BrierScore, Disagreement, NegativeLogLikelihood


class TinyNet(nn.Module):
    def __init__(self, num_classes, image_shape=(1, 4, 4)):
        super().__init__()
        c = image_shape[0]
        self.stem = nn.Conv2d(c, 4, 3, padding=1)
        self.body = nn.Sequential(nn.BatchNorm2d(4), nn.PReLU(4))
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(4, num_classes)
        self.feature_dim = self.stem_channels = 4

    def forward(self, x):
        return self.head(self.pool(self.body(self.stem(x))))


def ece_reference(probs: np.ndarray, labels: np.ndarray, bins: int = 15) -> float:
    conf, pred = probs.max(1), probs.argmax(1)
    edges = np.linspace(0, 1, bins + 1)
    total = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        inside = (conf > lo) & (conf <= hi)
        if inside.any():
            total += inside.mean() * abs((pred[inside] == labels[inside]).mean() - conf[inside].mean())
    return total


def test_metrics_match_numpy():
    torch.manual_seed(1)
    logits, labels = torch.randn(500, 7) * 3, torch.randint(0, 7, (500,))
    metrics = classification_metrics(7, "x/")
    for chunk in range(0, 500, 128):  # streaming over batches
        metrics.update(logits[chunk : chunk + 128], labels[chunk : chunk + 128])
    out = {k: v.item() for k, v in metrics.compute().items()}
    p, y = logits.softmax(-1).double().numpy(), labels.numpy()
    assert out["x/acc"] == pytest.approx((p.argmax(1) == y).mean(), abs=1e-6)
    assert out["x/nll"] == pytest.approx(-np.log(p[np.arange(500), y]).mean(), rel=1e-5)
    assert out["x/brier"] == pytest.approx(((p - np.eye(7)[y]) ** 2).sum(1).mean(), rel=1e-5)
    assert out["x/ece"] == pytest.approx(ece_reference(p, y), abs=1e-5)


def test_brier_perfect_and_worst():
    brier = BrierScore()
    brier.update(torch.tensor([[100.0, -100.0]]), torch.tensor([0]))
    assert brier.compute().item() == pytest.approx(0.0, abs=1e-6)
    brier = BrierScore()
    brier.update(torch.tensor([[100.0, -100.0]]), torch.tensor([1]))
    assert brier.compute().item() == pytest.approx(2.0, abs=1e-6)


def test_nll_equals_cross_entropy():
    logits, labels = torch.randn(64, 5), torch.randint(0, 5, (64,))
    nll = NegativeLogLikelihood()
    nll.update(logits, labels)
    assert nll.compute().item() == pytest.approx(F.cross_entropy(logits, labels).item(), rel=1e-6)


def test_disagreement_over_pairs():
    # three members, four samples: member predictions [0,0,0,0], [0,1,0,1], [1,1,1,1]
    preds = torch.tensor([[0, 0, 0, 0], [0, 1, 0, 1], [1, 1, 1, 1]])
    logits = F.one_hot(preds, 2).float()
    metric = Disagreement()
    metric.update(logits)
    # pairs: (0,1) 2/4, (0,2) 4/4, (1,2) 2/4 -> mean 8/12
    assert metric.compute().item() == pytest.approx(8 / 12)


def make_module(**kwargs) -> ClassifierModule:
    return ClassifierModule(backbone=TinyNet, num_classes=3, image_shape=(1, 4, 4), **kwargs)


def test_weight_decay_exclusions():
    module = make_module(no_weight_decay=["norm", "bias", "PReLU"])
    decay, no_decay = module.parameter_groups()
    names = {id(p): n for n, p in module.named_parameters()}
    assert sorted(names[id(p)] for p in decay["params"]) == ["network.head.weight", "network.stem.weight"]
    assert no_decay["weight_decay"] == 0.0
    assert len(no_decay["params"]) == 5  # stem bias, BN weight+bias, PReLU weight, head bias
    by_name = make_module(no_weight_decay=["head."]).parameter_groups()
    assert len(by_name[1]["params"]) == 2


def test_ensemble_is_mean_of_member_logits():
    module = make_module()
    members = torch.randn(3, 5, 3)
    assert torch.equal(module._ensemble(members), members.mean(0))


def test_factory_target_finds_class_behind_partial():
    assert _factory_target(partial(torch.optim.lr_scheduler.OneCycleLR, max_lr=0.1)) is torch.optim.lr_scheduler.OneCycleLR
    assert _factory_target(torch.optim.SGD) is torch.optim.SGD


def test_fit_fills_onecycle_length_and_warmup(tmp_path):
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader, TensorDataset

    data = TensorDataset(torch.randn(32, 1, 4, 4), torch.randint(0, 3, (32,)))
    module = make_module(
        optimizer=partial(torch.optim.SGD, lr=0.1),
        lr_scheduler=partial(torch.optim.lr_scheduler.OneCycleLR, max_lr=0.1),
        warmup_steps=4,
    )
    seen = []

    class Record(pl.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            seen.append(optimizer.param_groups[0]["lr"])

    trainer = pl.Trainer(
        max_epochs=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        callbacks=[Record()], default_root_dir=tmp_path, enable_model_summary=False,
    )
    trainer.fit(module, DataLoader(data, batch_size=4))
    scheduler = trainer.lr_scheduler_configs[0]
    assert scheduler.interval == "step"
    assert scheduler.scheduler.total_steps == 16
    onecycle = torch.optim.lr_scheduler.OneCycleLR(torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1), 0.1, total_steps=16)
    expected = []
    for _ in range(16):
        expected.append(onecycle.get_last_lr()[0])
        onecycle.optimizer.step()
        onecycle.step()
    factors = [(i + 1) / 4 if i < 4 else 1.0 for i in range(16)]
    assert seen == pytest.approx([e * f for e, f in zip(expected, factors)])

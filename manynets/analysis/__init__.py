"""Post-training analysis plumbing (ARCHITECTURE.md "Layout"): what saturation, probes, PCA sweeps,
receptive fields and subspace sweeps share, written once.

- :mod:`~manynets.analysis.selection`: which layers (``select_layers``, the parts of a model, layer types);
- :mod:`~manynets.analysis.tap`: one forward-hook tap (``LayerTap``);
- :mod:`~manynets.analysis.outputs`: the run directory's CSV tables (``write_csv``/``read_csv``:
  comma-separated, fractions, units in the header) and figures (``save_figure``);
- :mod:`~manynets.analysis.checkpoints`: the backbone of a checkpoint (``load_network``);
- :mod:`~manynets.analysis.passes`: extra passes over a data loader (``each_batch``, ``evaluate``);
- one module per analysis: ``saturation``, ``pca``, ``probes``, ``receptive_field``, ``subspace_sweep``,
  ``bn_recompute`` (BN statistics of subspace points).

Imports point one way (tests/test_imports.py): ``cli -> lightning_modules / callbacks -> analysis ->
networks -> layers -> cuda_ops``; the math lives in ``layers``; Lightning hooks live in ``callbacks``.
"""

from manynets.analysis.checkpoints import CheckpointNotFoundError, load_network, read_checkpoint
from manynets.analysis.outputs import (
    layer_labels,
    legend_outside,
    output_dir,
    read_csv,
    run_name,
    save_figure,
    titled,
    write_csv,
)
from manynets.analysis.passes import device_of, each_batch, evaluate, evaluation, prediction, train_and_test_loaders
from manynets.analysis.pca import SWEEP_DELTAS, PCALayers, delta_sweep, insert_pca_layers
from manynets.analysis.probes import extract_features, write_probe_results
from manynets.analysis.receptive_field import receptive_fields, write_receptive_fields
from manynets.analysis.saturation import SaturationTracker, plot_saturation, plot_saturation_heatmap
from manynets.analysis.selection import LAYER_TYPES, check_layer_options, layer_width, model_parts, select_layers
from manynets.analysis.tap import LayerTap

__all__ = [
    "LAYER_TYPES",
    "SWEEP_DELTAS",
    "CheckpointNotFoundError",
    "LayerTap",
    "PCALayers",
    "SaturationTracker",
    "check_layer_options",
    "delta_sweep",
    "device_of",
    "each_batch",
    "evaluate",
    "evaluation",
    "extract_features",
    "insert_pca_layers",
    "layer_labels",
    "layer_width",
    "legend_outside",
    "load_network",
    "model_parts",
    "output_dir",
    "plot_saturation",
    "plot_saturation_heatmap",
    "prediction",
    "read_checkpoint",
    "read_csv",
    "receptive_fields",
    "run_name",
    "save_figure",
    "select_layers",
    "titled",
    "train_and_test_loaders",
    "write_csv",
    "write_probe_results",
]

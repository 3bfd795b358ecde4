"""manynets: how much one network can hold (superposition, MixMo, subspaces, pi-nets, probes)."""

__version__ = "0.1.0"

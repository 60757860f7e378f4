"""ngdiag: diagnostics for RL post-trained flow-matching models."""

__version__ = "0.1.0"

"""Training methods, one module each, behind :class:`~ngdiag.train.methods.base.Method`.

:data:`METHODS` maps the config's ``method`` to its class; each class names its config section
(``settings_class``), defined beside it.
"""

from ngdiag.train.methods.awm import AWM, AWMConfig
from ngdiag.train.methods.base import Method, MicroBatch, OldPolicyMethod, Points, StepLoss, Velocities
from ngdiag.train.methods.dpo import DPO, DPOConfig
from ngdiag.train.methods.fm import FMConfig, FlowMatching
from ngdiag.train.methods.nft import NFT, NFTConfig

__all__ = [
    "METHODS", "Method", "OldPolicyMethod", "MicroBatch", "Points", "StepLoss", "Velocities",
    "NFT", "NFTConfig", "AWM", "AWMConfig", "DPO", "DPOConfig", "FlowMatching", "FMConfig",
]

METHODS = {m.name: m for m in (NFT, AWM, DPO, FlowMatching)}
"""Training methods by name: DiffusionNFT, Advantage Weighted Matching, Diffusion-DPO, flow matching."""

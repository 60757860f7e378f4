"""Training with the NormGuard penalty (paper eq. 7-8) on top of velocity-local losses.

The losses are pure functions on tensors (:mod:`ngdiag.train.losses`, all exported here); the
trainer (:mod:`ngdiag.train.trainer`: the loop, with :mod:`~ngdiag.train.rollouts`,
:mod:`~ngdiag.train.policy`, :mod:`~ngdiag.train.run_folder`, :mod:`~ngdiag.train.distributed` and
one module per method in :mod:`ngdiag.train.methods`), its config and the ``ngdiag train``
command build on them.
"""

from ngdiag.core.lazy import lazy_attributes
from ngdiag.train import losses
from ngdiag.train.config import TrainConfig, load_config
from ngdiag.train.losses import *  # noqa: F401,F403 (the names of losses.__all__)

__all__ = ["TrainConfig", "load_config", "train", "compare_runs"]
__all__ += losses.__all__


# The trainer and the comparison pull in diffusers/peft; import them on first use.
__getattr__ = lazy_attributes(__name__, {"train": "ngdiag.train.trainer", "compare_runs": "ngdiag.workflows.compare"})

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MPLBACKEND", "Agg")

import torch  # noqa: E402

torch.set_num_threads(1)

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_bases(tmp_path_factory):
    """Tiny base pipelines (output bias zeroed, so planted scales act multiplicatively), saved once."""
    from ngdiag.testing import save_planted_base

    root = tmp_path_factory.mktemp("bases")
    return {fam: save_planted_base(root / fam, fam) for fam in ("sd3", "flux", "flux2-klein", "qwenimage")}

"""The config engine (ngdiag.core.configs): its documented example runs as written."""

from __future__ import annotations

import doctest


def test_the_config_engine_example_runs_as_documented():
    import ngdiag.core.configs as configs

    result = doctest.testmod(configs, verbose=False)
    assert result.attempted == 6 and result.failed == 0

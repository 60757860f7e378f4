"""The config engine (ngdiag.core.configs): its documented example runs as written."""

from __future__ import annotations

import doctest


def test_the_config_engine_example_runs_as_documented():
    import ngdiag.core.configs as configs

    result = doctest.testmod(configs, verbose=False)
    assert result.attempted == 6 and result.failed == 0


def test_a_value_the_section_dataclass_refuses_is_named_by_its_config_key():
    """The training config's ``sampling:`` is a SamplingConfig whose fields have other names
    (``steps`` is ``num_steps``); its own range checks are reported under the YAML key."""
    import pytest

    from ngdiag.core.errors import ConfigError
    from ngdiag.train.config import TrainConfig

    cases = [
        ({"steps": 0}, "sampling.steps: the number of steps must lie in [1, 1000], got 0"),
        ({"steps": 3, "guidance": -1}, "sampling.guidance: guidance scale must be a finite number >= 0, got -1.0"),
        ({"height": 5000, "steps": 3}, "sampling.height: height must lie in [1, 4096], got 5000"),
    ]
    for section, message in cases:
        with pytest.raises(ConfigError) as info:
            TrainConfig.from_dict({"sampling": section})
        assert str(info.value) == message

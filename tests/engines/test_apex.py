"""engine.apex: NVIDIA apex's FusedAdam for the native engine, refused with how to build apex where it cannot run."""

from __future__ import annotations

import pytest
from st_common import TINY

from scaletrain.config import load_config
from scaletrain.validate import validate_config


def test_apex_is_refused_with_how_to_build_it_when_nvidia_apex_cannot_run():
    # This machine has neither NVIDIA apex nor a GPU; where both exist the option swaps in FusedAdam.
    with pytest.raises(ValueError, match=r"engine\.apex: .*Build it from https://github\.com/NVIDIA/apex"):
        validate_config(load_config(TINY, ["--engine.apex", "true"]), 1)
    with pytest.raises(ValueError, match=r"engine\.apex: apex's FusedAdam replaces the native engine's optimizer"):
        validate_config(load_config(TINY, ["--engine.apex", "true", "--engine.name", "fairscale"]), 2)

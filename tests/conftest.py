import os

import pytest
import torch
from hypothesis import HealthCheck, settings

# Hypothesis profiles: "ci" is derandomized and sized for CI's 2-core budget; "dev" draws more
# examples with fresh randomness; "gpu" is the long profile used on the device machine.
_common = dict(deadline=None, print_blob=True, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("ci", max_examples=25, derandomize=True, **_common)
settings.register_profile("dev", max_examples=60, **_common)
settings.register_profile("gpu", max_examples=150, **_common)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

# Without a GPU the raw Triton kernels run under Triton's interpreter (numpy on the CPU). It is
# chosen when a kernel is decorated, so it has to be set before hgrn2mini.kernels is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Hypothesis profiles: "ci" is derandomized and sized for CI's 2-core budget; "dev" draws more
# examples with fresh randomness; "gpu" is the long profile used on the device machine.
_common = dict(deadline=None, print_blob=True, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("ci", max_examples=25, derandomize=True, **_common)
settings.register_profile("dev", max_examples=60, **_common)
settings.register_profile("gpu", max_examples=150, **_common)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)

"""Shared test setup.

Triton kernels run on the CPU through Triton's interpreter when there is no GPU, so the
environment switch must be set before any Triton kernel is defined.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

FULL = os.environ.get("GRADES_FULL", "0") == "1"


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module (``pytest.mark.usefixtures("one_thread")``): tiny models' many
    small ops run far faster on one thread than on a busy pool."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def available_backends(device: str, kind: str) -> list[str]:
    """Names of backends usable for ``kind`` ("list"/"flat") inputs on ``device`` in this process."""
    from grades import backends
    dev = torch.device(device)
    out = []
    for name, (ok, _) in backends.availability().items():
        if ok and backends.get(name).supports(dev, kind):
            out.append(name)
    return out

"""What this process can run: versions, devices and backend availability."""
from __future__ import annotations

import platform


def report() -> dict:
    import torch

    from . import __version__, backends
    cuda = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "grades": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cuda_device": cuda,
        "backends": {name: {"available": ok, "detail": detail}
                     for name, (ok, detail) in backends.availability().items()},
    }

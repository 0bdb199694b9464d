"""What every benchmark script shares: naming the device and the results folder.

Results of one machine go to one folder, ``bench/results/<slug>``: ``cuda-<gpu name>`` or
``cpu-<cpu model>``. Settings that change a run without changing the machine (threads, sizes,
seeds) are recorded inside each JSON, not in the folder name.
"""
from __future__ import annotations

import os
import platform
import re
from typing import Union

import torch

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def device_name(device: Union[str, torch.device]) -> str:
    """The GPU's name, or the CPU's model name (``/proc/cpuinfo``; the machine type elsewhere)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def device_slug(device: Union[str, torch.device]) -> str:
    """``cuda-nvidia-h100-80gb-hbm3``, ``cpu-amd-epyc``: the results folder name of a device."""
    device = torch.device(device)
    name = re.sub(r"[^a-z0-9]+", "-", device_name(device).lower()).strip("-")
    kind = "cuda" if device.type == "cuda" else "cpu"
    if name.startswith(kind + "-"):
        return name
    return f"{kind}-{name}" if name else kind


def results_dir(device: Union[str, torch.device], out: Union[str, os.PathLike, None] = None) -> str:
    """``out`` if given, else ``bench/results/<device slug>``; created if missing."""
    path = os.fspath(out) if out is not None else os.path.join(RESULTS, device_slug(device))
    os.makedirs(path, exist_ok=True)
    return path

"""What a benchmark result records about where it ran: versions and machine (shared by the GPU benchmarks)."""

from __future__ import annotations

import os
import platform

import torch
import transformers

import surgeon_fx as sf


def versions() -> dict:
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "surgeon_fx": sf.__version__,
    }


def machine(device: torch.device) -> dict:
    return {
        "gpu": torch.cuda.get_device_name() if device.type == "cuda" else None,
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
    }

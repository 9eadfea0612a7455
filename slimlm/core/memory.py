"""How much memory a device has free, for choices that trade memory for time."""

from __future__ import annotations

import torch


def available_memory(device: torch.device | str = "cpu") -> int | None:
    """Bytes a new allocation can get: for CPU the kernel's MemAvailable, for CUDA the driver's free memory
    plus what PyTorch's allocator holds unused; None where that is unknown."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None

"""``sys/*`` metrics: host and accelerator memory of this process (rank 0 when logged by the loop).

    sys/rss_gb                  resident set size now
    sys/rss_peak_gb             peak resident set size since start (getrusage ru_maxrss)
    sys/host_available_gb       memory the host can still give (psutil: available)
    sys/cuda_allocated_gb       CUDA tensors allocated now             (GPU only)
    sys/cuda_max_allocated_gb   peak allocated since start             (GPU only)
    sys/cuda_max_reserved_gb    peak reserved by the caching allocator (GPU only)

Reading these costs no device synchronisation and no collective.
"""

from __future__ import annotations

import resource
import sys

GB = float(1 << 30)


def system_metrics(device=None) -> dict[str, float]:
    import psutil
    import torch

    rss = psutil.Process().memory_info().rss
    # ru_maxrss is KiB on Linux, bytes on macOS.
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    m = {"sys/rss_gb": rss / GB, "sys/rss_peak_gb": peak / GB,
         "sys/host_available_gb": psutil.virtual_memory().available / GB}
    if torch.cuda.is_available() and (device is None or getattr(device, "type", "cuda") == "cuda"):
        m.update({"sys/cuda_allocated_gb": torch.cuda.memory_allocated(device) / GB,
                  "sys/cuda_max_allocated_gb": torch.cuda.max_memory_allocated(device) / GB,
                  "sys/cuda_max_reserved_gb": torch.cuda.max_memory_reserved(device) / GB})
    return m

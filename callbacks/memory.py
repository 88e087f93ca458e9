"""Report peak memory at the end of fit, as the SFT seed printed it."""

from __future__ import annotations

import resource
import sys

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info


class PeakMemory(L.Callback):
    """On CUDA: peak allocated and reserved memory, the GPU's total, and the share used by training; on
    CPU: peak RSS."""

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.start_reserved_gb = 0.0
        if pl_module.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(pl_module.device)
            self.start_reserved_gb = torch.cuda.max_memory_reserved(pl_module.device) / 2**30

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        stats = peak_memory(pl_module.device, getattr(self, "start_reserved_gb", 0.0))
        rank_zero_info("[distill] " + ", ".join(f"{k} = {v}" for k, v in stats.items()))
        if trainer.logger is not None:
            trainer.logger.log_metrics({f"memory/{k}": v for k, v in stats.items()}, step=trainer.global_step)


def peak_memory(device: torch.device, start_reserved_gb: float = 0.0) -> dict[str, float]:
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory / 2**30
        peak = torch.cuda.max_memory_reserved(device) / 2**30
        return {
            "peak_allocated_gb": round(torch.cuda.max_memory_allocated(device) / 2**30, 3),
            "peak_reserved_gb": round(peak, 3),
            "total_gb": round(total, 3),
            "peak_share": round(peak / total, 4),
            "training_share": round((peak - start_reserved_gb) / total, 4),
        }
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # ru_maxrss is KiB on Linux, bytes on macOS
    return {"peak_rss_gb": round(rss / (2**30 if sys.platform == "darwin" else 2**20), 3)}

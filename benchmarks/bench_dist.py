"""Bytes communicated per distributed Gram step, against the model size P and the number of tasks K.

    python benchmarks/bench_dist.py            # launches itself under torchrun with 2 gloo processes (CPU)

Every all-reduce of ``gradconflict.distributed.all_reduce_sum`` is counted (payload bytes per rank). The
fused engine reduces each layer's K per-task gradients once (K x P values in the model's dtype), plus the
task counts and losses and the full gradient used by the self-check (P values in float64).
"""

from __future__ import annotations

import os
import subprocess
import sys

import torch


def worker() -> None:
    import pandas as pd

    import gradconflict as gc
    from gradconflict import distributed as D
    from gradconflict.models import build_model

    D.init_from_env()
    counted = {"bytes": 0, "calls": 0}
    original = D.all_reduce_sum

    def counting(x: torch.Tensor) -> torch.Tensor:
        counted["bytes"] += x.numel() * x.element_size()
        counted["calls"] += 1
        return original(x)

    D.all_reduce_sum = counting
    rows = []
    schedule = gc.NoiseSchedule.linear()
    for name in ["dit-tiny", "unet-tiny"]:
        torch.manual_seed(0)
        model = build_model(name)
        P = sum(p.numel() for p in model.parameters() if p.requires_grad)
        for K in [10, 100]:
            bins = gc.TimestepBins.uniform(1000, K)
            t, task = bins.sample(2, torch.Generator().manual_seed(0))
            x0 = torch.randn(len(t), 1, 16, 16, generator=torch.Generator().manual_seed(1))
            mine = D.shard(len(t))
            counted.update(bytes=0, calls=0)
            gc.task_gram(model, x0[mine], t[mine], task[mine], K=K, schedule=schedule,
                         generator=torch.Generator().manual_seed(2))
            rows.append(dict(model=name, P=P, K=K, all_reduces=counted["calls"], MB=counted["bytes"] / 1e6,
                             bytes_per_KP_float32=counted["bytes"] / (K * P * 4)))
    if D.is_main():
        print(pd.DataFrame(rows).to_string(index=False, float_format=lambda v: f"{v:.3g}"))
        print("bytes_per_KP_float32 = bytes / (K * P * 4): 1 means one float32 per task-gradient entry")
    D.shutdown()


if __name__ == "__main__":
    if "RANK" in os.environ:
        worker()
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", __file__]
        sys.exit(subprocess.call(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}))

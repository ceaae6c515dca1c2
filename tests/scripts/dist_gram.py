"""Run under torchrun (2 gloo ranks): each rank computes the Gram on its share of one seeded batch."""

import os
import sys

import torch

import gradconflict as gc
from gradconflict import distributed as D

sys.path.insert(0, sys.argv[2])
from zoo import UNetLike, seeded_problem  # noqa: E402

D.init_from_env()
mode = sys.argv[3]
if mode == "fail" and D.rank() == 1:
    raise RuntimeError("rank 1 failed on purpose")
if mode == "slow_wait":  # rank 0 busy for longer than the collective timeout (as when it trains alone)
    import time

    if D.is_main():
        time.sleep(8)
    D.wait_for_all()
    if D.is_main():
        torch.save({"ok": True}, sys.argv[1])
    D.shutdown()
    sys.stdout.flush()
    os._exit(0)
if mode == "track_resume":  # each rank sees its own --out: rank 0's already holds step 0, rank 1's is empty
    from gradconflict.track import TrackConfig, track_models

    torch.manual_seed(0)
    models = [(0, UNetLike().double()), (5, UNetLike().double())]
    images = torch.randn(32, 1, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    res = track_models(models, images, gc.NoiseSchedule.linear(), "eps",
                       TrackConfig(bins=4, per_task=3, resamples=2, ugd_steps=50, fw_max_iter=50),
                       out_dir=f"{sys.argv[1]}_rank{D.rank()}", progress=False)
    if D.is_main():
        torch.save({"grams": res.grams}, sys.argv[1])
    D.shutdown()
    sys.stdout.flush()
    os._exit(0)
if mode == "track":
    from gradconflict.track import TrackConfig, track_models

    torch.manual_seed(0)
    images = torch.randn(32, 1, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    res = track_models([(0, UNetLike().double())], images, gc.NoiseSchedule.linear(), "eps",
                       TrackConfig(bins=4, per_task=3, resamples=2, ugd_steps=50, fw_max_iter=50), progress=False)
    if D.is_main():
        torch.save({"grams": res.grams, "objectives": res.objectives.to_dict("list")}, sys.argv[1])
    D.shutdown()
    sys.stdout.flush()
    os._exit(0)  # skip C++ static destructors: gloo threads can abort a finished process on a loaded machine
# a setting the ranks must share (the automatic memory budget): every rank gets the smallest
assert D.all_reduce_min(10 + 7 * D.rank()) == 10, "all_reduce_min must return the smallest value over ranks"
model, x0, t, task, noise = seeded_problem()
mine = D.shard(len(t))
res = gc.task_gram(model, x0[mine], t[mine], task[mine], K=4, schedule=gc.NoiseSchedule.linear(), noise=noise[mine],
                   method=mode if mode in ("fused", "loop") else "fused", sketch_dim=64)
if D.is_main():
    torch.save({"gram": res.gram, "losses": res.losses, "counts": res.counts, "sketch": res.sketch}, sys.argv[1])
D.shutdown()
sys.stdout.flush()
os._exit(0)  # see above

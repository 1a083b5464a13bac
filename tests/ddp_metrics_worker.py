"""Run the metrics on several real gloo processes with uneven (and empty) shards.

    python tests/ddp_metrics_worker.py INPUT.pt OUTPUT.json SIZES

INPUT.pt holds ``images`` (N, C, H, W) uint8, ``rewards`` (N,), ``groups`` (N,) and
``reference`` (path of a saved ReferenceStats file). SIZES is a comma-separated list of shard
sizes (one per rank, summing to N; zeros allowed). Rank r takes its contiguous shard, updates in
batches of 4, every rank computes, rank 0 writes the results as JSON. Run as a subprocess (a
spawned pytest would re-run the test session). The ranks are forked after the imports, so the
run costs one interpreter start, not one per rank.
"""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist


def run(rank: int, world: int, inp: str, out: str, sizes: list[int], pg_file: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{pg_file}", rank=rank, world_size=world)
    try:
        import metrics as M

        data = torch.load(inp, weights_only=True)
        start = sum(sizes[:rank])
        sl = slice(start, start + sizes[rank])
        images, rewards, groups = data["images"][sl], data["rewards"][sl], data["groups"][sl]
        stats = M.RewardStatistics()
        fid = M.FrechetDistance("digits", reference=data["reference"])
        div = M.Diversity("digits")
        for s in range(0, images.shape[0], 4):
            stats.update(rewards[s:s + 4])
            fid.update(images[s:s + 4])
            div.update(images[s:s + 4], groups[s:s + 4])
        res = {"stats": stats.compute(), "fid": float(fid.compute()), "diversity": div.compute(),
               "local_count": int(images.shape[0])}
        if rank == 0:
            res["diversity"]["per_group"] = {str(k): v for k, v in res["diversity"]["per_group"].items()}
            with open(out, "w") as f:
                json.dump(res, f)
        dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import metrics  # noqa: F401  (imported once, before forking)
    import ntrk_lightning.backbones.digits_unet  # noqa: F401

    inp, out, sizes_s = sys.argv[1:4]
    sizes = [int(s) for s in sizes_s.split(",")]
    pg_file = out + ".pg"
    if os.path.exists(pg_file):
        os.unlink(pg_file)
    torch.multiprocessing.start_processes(run, args=(len(sizes), inp, out, sizes, pg_file), nprocs=len(sizes),
                                          join=True, start_method="fork")

"""PyTorch DDP (Gloo) gradient synchronisation, the reference for ``hsat bench sync``.

One rank of a 2-process ``DistributedDataParallel`` job with the Gloo backend, over
parameters with given shapes (hsat's ResNet-50 encoder when driven by ``hsat bench
sync``; torchvision's ResNet-50 when run by hand). DDP runs with its defaults:
25 MB buckets (``bucket_cap_mb=25``), ``gradient_as_bucket_view=False``, gradients
averaged over ranks.

What is timed, and why. DDP hides its all-reduce inside ``backward()`` (bucket hooks
fire as gradients become ready), so its cost cannot be timed as a separate call. It
is measured as the time it adds to ``backward()``: each round runs, after a barrier,

1. ``backward()`` under ``ddp.no_sync()`` (gradients computed, nothing communicated),
2. ``backward()`` with DDP active (gradients computed, copied into buckets, each
   bucket divided by the world size and all-reduced, results copied back),

and reports ``t2 - t1``. The model's loss is ``sum_p (p * c_p).sum()`` with fixed random
``c_p``, so backward's own compute is a cheap elementwise product (the same in both
runs and cancelled by the subtraction) and there is nothing for DDP to overlap its
communication with: the number is DDP's synchronisation machinery itself (bucketing
copies, division, Gloo all-reduce, copy-back, hook overhead). ``hsat bench sync``
times hsat's ``GradientSync::average`` after a barrier. Note the one design difference:
after its first call hsat's gradients live in its buckets (like DDP with
``gradient_as_bucket_view=True``), so its steady state is scale + all-reduce, while DDP
here runs with its default (``False``: copy into buckets, copy back). Both rank processes report; the driver takes the
slower rank per round. ``zero_grad(set_to_none=True)`` precedes every backward.

Usage (each of the 2 ranks; rank 0 hosts the store on PORT):

    "$HSAT_PYTHON" bench/ddp_sync_reference.py --rank R --world-size 2 --port PORT \
        [--shapes shapes.json] [--threads 1] [--bucket-mb 25]

``shapes.json`` is a JSON list of shapes (lists of ints); without it torchvision's
ResNet-50 parameter shapes are used (25.6M parameters).

Line protocol on stdin/stdout (so the Rust benchmark can alternate with it): after
setup and two warm-up rounds it prints ``ready <parameters> <buckets>``; for every
stdin line ``round`` it prints ``<ddp_sync_s> <backward_sync_s> <backward_nosync_s>``;
``quit`` or EOF exits 0. Everything is flushed immediately.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn as nn


class Grads(nn.Module):
    """Parameters of the given shapes; ``forward`` returns ``sum_p (p * c_p).sum()``."""

    def __init__(self, shapes: list[list[int]]) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.params = nn.ParameterList(
            nn.Parameter(torch.randn(s, generator=gen)) for s in shapes
        )
        self.coeffs = [torch.randn(s, generator=gen) for s in shapes]

    def forward(self) -> torch.Tensor:
        return torch.stack([(p * c).sum() for p, c in zip(self.params, self.coeffs)]).sum()


def resnet50_shapes() -> list[list[int]]:
    import torchvision

    return [list(p.shape) for p in torchvision.models.resnet50().parameters()]


def timed_backward(ddp: nn.parallel.DistributedDataParallel, sync: bool) -> float:
    ddp.zero_grad(set_to_none=True)
    if sync:
        loss = ddp()
        dist.barrier()
        start = time.perf_counter()
        loss.backward()
        return time.perf_counter() - start
    with ddp.no_sync():
        loss = ddp()
        dist.barrier()
        start = time.perf_counter()
        loss.backward()
        return time.perf_counter() - start


def one_round(ddp: nn.parallel.DistributedDataParallel) -> tuple[float, float, float]:
    nosync = timed_backward(ddp, sync=False)
    synced = timed_backward(ddp, sync=True)
    return synced - nosync, synced, nosync


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--shapes", help="JSON list of parameter shapes")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--bucket-mb", type=int, default=25, help="DDP's bucket_cap_mb")
    parser.add_argument("--standalone", type=int, default=0, help="run N rounds, print the median")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    if args.shapes:
        with open(args.shapes) as f:
            shapes = json.load(f)
    else:
        shapes = resnet50_shapes()
    store = dist.TCPStore(
        "127.0.0.1", args.port, args.world_size, is_master=args.rank == 0,
        timeout=timedelta(seconds=120),
    )
    dist.init_process_group(
        "gloo", store=store, rank=args.rank, world_size=args.world_size,
        timeout=timedelta(seconds=120),
    )
    model = Grads(shapes)
    ddp = nn.parallel.DistributedDataParallel(model, bucket_cap_mb=args.bucket_mb)
    # Two warm-ups: DDP rebuilds its buckets in gradient-ready order after the first.
    one_round(ddp)
    one_round(ddp)
    params = sum(p.numel() for p in model.parameters())
    logged = ddp._get_ddp_logging_data()
    buckets = len(logged.get("rebuilt_bucket_sizes", logged.get("bucket_sizes", "")).split(","))

    if args.standalone:
        times = sorted(one_round(ddp)[0] for _ in range(args.standalone))
        print(f"median DDP sync {times[len(times) // 2]:.4f} s", flush=True)
        dist.destroy_process_group()
        return 0

    print(f"ready {params} {buckets}", flush=True)
    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "quit":
            break
        if cmd != "round":
            print(f"unknown command {cmd!r}", file=sys.stderr, flush=True)
            return 2
        sync, synced, nosync = one_round(ddp)
        print(f"{sync:.6f} {synced:.6f} {nosync:.6f}", flush=True)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())

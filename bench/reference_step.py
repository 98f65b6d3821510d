"""PyTorch reference HSAT training step, for timing against the Rust engine.

One step = PGD on the hierarchical loss (model in eval mode, done the way the paper's
code does it: delta is an nn.Parameter, model.zero_grad() + loss.backward() so the
parameter gradients are computed too, sign step, both clamps), then model.train() and
the only_adv outer step (p_s_pt levels, T = T_base = 0.07) with AdamW (lr 1e-3).

Model: torchvision backbone (fc = Identity) -> Linear(feat_dim, 128) (xavier-uniform,
bias 0.01) -> L2 normalisation. Batch [2,2,2,2,3,H,W] uniform in [0, 1], drawn once
at setup and reused by every step.

Usage:

    "$HSAT_PYTHON" bench/reference_step.py --backbone resnet18 --image-size 64 --threads 2 [--iters 5]

Line protocol on stdin/stdout (so a Rust benchmark can alternate with it in one run):
after setup and one warm-up step it prints ``ready``; then for every stdin line
``step`` it runs one full step and prints its wall time in seconds on its own line;
``quit`` or EOF exits 0 (any other non-empty line exits 2). All output is flushed immediately.

Manual use: ``--standalone N`` runs N timed steps (after the warm-up), prints each
time to stderr and the median (seconds) to stdout.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

BATCH = (2, 2, 2, 2)  # B, S, P, V
EMB_DIM = 128
EPS = 8 / 255
ALPHA = 2 / 255
TEMPERATURE = 0.07
BASE_TEMPERATURE = 0.07
FEAT_DIM = {"resnet18": 512, "resnet34": 512, "resnet50": 2048, "resnet101": 2048, "wide_resnet50_2": 2048}


class Net(nn.Module):
    def __init__(self, backbone: str) -> None:
        super().__init__()
        self.backbone = getattr(torchvision.models, backbone)()
        self.backbone.fc = nn.Identity()
        self.proj = nn.Linear(FEAT_DIM[backbone], EMB_DIM)
        nn.init.xavier_uniform_(self.proj.weight)
        nn.init.constant_(self.proj.bias, 0.01)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.proj(self.backbone(x)), dim=-1)


def supcon_unsup(feats: torch.Tensor) -> torch.Tensor:
    """SupCon, unsupervised form; feats [N, M, D] (method.md section 4)."""
    n, m, _ = feats.shape
    z = torch.cat(torch.unbind(feats, dim=1), dim=0)
    logits = torch.matmul(z, z.T) / TEMPERATURE
    logits = logits - logits.max(dim=1, keepdim=True).values.detach()
    group = torch.arange(n, device=feats.device).repeat(m)
    not_self = 1.0 - torch.eye(n * m, dtype=feats.dtype, device=feats.device)
    pos = (group[:, None] == group[None, :]).to(feats.dtype) * not_self
    log_prob = logits - torch.log((torch.exp(logits) * not_self).sum(1, keepdim=True))
    mean_log_prob_pos = (pos * log_prob).sum(1) / pos.sum(1)
    return (-(TEMPERATURE / BASE_TEMPERATURE) * mean_log_prob_pos).mean()


def hier_loss(emb: torch.Tensor) -> torch.Tensor:
    """p_s_pt with unit weights; emb [B, S, P, V, D]."""
    b, s, p, v, d = emb.shape
    return (
        supcon_unsup(emb.reshape(b, s * p * v, d))
        + supcon_unsup(emb.reshape(b * s, p * v, d))
        + supcon_unsup(emb.reshape(b * s * p, v, d))
    )


def embed(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = model(x.reshape(-1, *x.shape[-3:]))
    return out.reshape(*x.shape[:4], out.shape[-1])


def hsat_step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, iters: int) -> float:
    # inner maximisation, paper-style
    model.eval()
    delta = nn.Parameter(torch.rand_like(x) * EPS * 2 - EPS)
    for _ in range(iters):
        model.zero_grad()
        loss = hier_loss(embed(model, x + delta))
        loss.backward()
        delta.data = delta.data + ALPHA * torch.sign(delta.grad.data)
        delta.data = torch.clamp(delta.data, -EPS, EPS)
        delta.data = torch.clamp(x + delta.data, 0, 1) - x
        delta.grad.zero_()
    x_adv = (x + delta).detach()
    # outer minimisation, only_adv
    model.train()
    loss = hier_loss(embed(model, x_adv))
    opt.zero_grad()
    loss.backward()
    opt.step()
    return loss.item()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backbone", default="resnet18", choices=sorted(FEAT_DIM))
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--iters", type=int, default=5, help="PGD iterations")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--standalone", type=int, metavar="N", help="run N timed steps, print the median")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model = Net(args.backbone)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.rand(*BATCH, 3, args.image_size, args.image_size)

    hsat_step(model, opt, x, args.iters)  # warm-up

    def timed() -> float:
        t0 = time.perf_counter()
        hsat_step(model, opt, x, args.iters)
        return time.perf_counter() - t0

    if args.standalone is not None:
        times = []
        for i in range(args.standalone):
            times.append(timed())
            print(f"step {i}: {times[-1]:.4f} s", file=sys.stderr, flush=True)
        print(f"{statistics.median(times):.6f}", flush=True)
        return 0

    print("ready", flush=True)
    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "step":
            print(f"{timed():.6f}", flush=True)
        elif cmd == "quit":
            break
        elif cmd:
            print(f"error: unknown command {cmd!r}", file=sys.stderr, flush=True)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Reference data pipeline for `hsat bench data`: what HiDisc does per patch.

Reads OpenSRH-style 2-channel uint16 TIFF patches with tifffile, applies the base
processing (divide by 65536, third channel CH3 - CH2 + 5000/65536, clamp) and the
strong augmentation list of the reference config (main.yaml, rand_aug_prob 0.3) with
torchvision 0.28 transforms on tensors, one view per patch, on one thread.

Usage: python bench/augment_reference.py --size 300 FILE... ; prints "<patches>/<seconds>".
"""

import argparse
import random
import sys
import time

import numpy as np
import tifffile
import torch
from torch.nn import ModuleList
from torchvision import transforms as T


class GaussianNoise(torch.nn.Module):
    def __init__(self, min_var=0.01, max_var=0.1):
        super().__init__()
        self.min_var, self.max_var = min_var, max_var

    def forward(self, x):
        var = random.uniform(self.min_var, self.max_var)
        return torch.clamp(x + torch.randn(x.size()) * var, 0.0, 1.0)


def base(two_channel: torch.Tensor) -> torch.Tensor:
    x = two_channel / 65536.0
    ch2, ch3 = x[0], x[1]
    return torch.stack((ch3 - ch2 + 5000 / 65536.0, ch2, ch3), dim=0).clamp(0.0, 1.0)


def strong(p: float, size: int):
    rand_apply = lambda m: T.RandomApply(ModuleList([m]), p=p)
    return T.Compose([
        T.RandomHorizontalFlip(p=p),
        T.RandomVerticalFlip(p=p),
        rand_apply(GaussianNoise()),
        rand_apply(T.ColorJitter(0.4, 0.4, 0.4, 0.1)),
        T.RandomAutocontrast(p=p),
        T.RandomSolarize(threshold=0.2, p=p),
        T.RandomAdjustSharpness(sharpness_factor=2, p=p),
        rand_apply(T.GaussianBlur(kernel_size=5, sigma=1)),
        rand_apply(T.RandomAffine(degrees=10, translate=(0.1, 0.3))),
        rand_apply(T.RandomResizedCrop(size=size)),
        T.RandomErasing(p=p),
    ])


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", type=int, default=300)
    parser.add_argument("--prob", type=float, default=0.3)
    parser.add_argument("files", nargs="+")
    args = parser.parse_args()
    torch.set_num_threads(1)
    random.seed(0)
    torch.manual_seed(0)
    aug = strong(args.prob, args.size)
    # Warm-up on the first file (imports, allocator).
    aug(base(torch.from_numpy(tifffile.imread(args.files[0]).astype(np.float32))))
    started = time.perf_counter()
    for path in args.files:
        image = torch.from_numpy(tifffile.imread(path).astype(np.float32)).contiguous()
        view = aug(base(image))
        assert view.shape[-1] == args.size
    elapsed = time.perf_counter() - started
    print(f"{len(args.files)}/{elapsed:.6f}")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Reads an `hsat synth` output with standard tools (tifffile, Pillow, numpy).

Checks that every patch listed by the metadata opens, has the expected shape and
dtype, and prints value ranges; for OpenSRH it also checks that each TIFF is
byte-for-byte what `tifffile.imwrite(path, array, software="hsat synth")` writes for
the same array (the layout hsat's generator copies). Exits non-zero on any problem.

Usage:
    python scripts/check_synth.py DIR [--montage OUT.png]
    python scripts/check_synth.py --write-tiff-fixture data/src/synth/fixtures/tifffile_2x5x7.tif

`--montage` writes a picture of a few patches per class (rows) for a visual look;
`--write-tiff-fixture` regenerates the fixture of the TIFF writer's unit test.
Needs numpy, tifffile and Pillow (the hsat venv has them).
"""

import argparse
import csv
import io
import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image

SOFTWARE = "hsat synth"


def write_tiff_fixture(path):
    array = (np.arange(70, dtype=np.uint16) * 937).reshape(2, 5, 7)
    tifffile.imwrite(path, array, software=SOFTWARE)
    print(f"wrote {path} with tifffile {tifffile.__version__}")


def base_process(array):
    """hsat's base processing of a (2, H, W) uint16 SRH patch -> (3, H, W) in [0, 1]."""
    x = array.astype(np.float32) / 65536.0
    third = x[1] - x[0] + 5000.0 / 65536.0
    return np.clip(np.stack([third, x[0], x[1]]), 0.0, 1.0)


def check_opensrh(root, problems):
    meta = json.loads((root / "meta" / "opensrh.json").read_text())
    split = json.loads((root / "meta" / "train_val_split.json").read_text())
    ids = set(split["train"]) | set(split["val"])
    if ids != set(meta):
        problems.append("train_val_split.json and opensrh.json list different patients")
    patches = []  # (class, patient, path)
    for patient, entry in sorted(meta.items()):
        key = "normal_patches" if entry["class"] == "normal" else "tumor_patches"
        for slide in entry["slides"].values():
            patches.extend((entry["class"], patient, p) for p in slide[key])
    raw_min, raw_max, raw_q = [], [], []
    base_lo, base_hi = np.full(3, np.inf), np.full(3, -np.inf)
    identical = 0
    images = {}
    for cls, patient, rel in patches:
        path = root / rel
        array = tifffile.imread(path)
        if array.shape[0] != 2 or array.ndim != 3 or array.dtype != np.uint16:
            problems.append(f"{rel}: shape {array.shape} dtype {array.dtype}, expected (2, H, W) uint16")
            continue
        with tifffile.TiffFile(path) as tif:
            if len(tif.pages) != 2 or not tif.is_shaped:
                problems.append(f"{rel}: {len(tif.pages)} pages, shaped={tif.is_shaped}")
        buffer = io.BytesIO()
        tifffile.imwrite(buffer, array, software=SOFTWARE)
        if buffer.getvalue() == path.read_bytes():
            identical += 1
        else:
            problems.append(f"{rel}: differs from tifffile.imwrite of the same array")
        raw_min.append(array.min(axis=(1, 2)))
        raw_max.append(array.max(axis=(1, 2)))
        raw_q.append(np.percentile(array, [1, 50, 99], axis=(1, 2)))
        base = base_process(array)
        base_lo = np.minimum(base_lo, base.min(axis=(1, 2)))
        base_hi = np.maximum(base_hi, base.max(axis=(1, 2)))
        images.setdefault(cls, []).append((patient, base))
    shapes = {tifffile.imread(root / p).shape for _, _, p in patches[:1]}
    q = np.mean(raw_q, axis=0)
    print(f"opensrh: {len(meta)} patients ({len(split['train'])} train, {len(split['val'])} val), "
          f"{len(patches)} patches, shape {shapes.pop() if shapes else '?'} uint16")
    print(f"  byte-identical to tifffile.imwrite(..., software={SOFTWARE!r}): {identical}/{len(patches)}")
    for c, name in enumerate(["CH2", "CH3"]):
        print(f"  {name}: min {np.min(raw_min, axis=0)[c]}, max {np.max(raw_max, axis=0)[c]}, "
              f"mean per-patch 1%/50%/99% {q[0][c]:.0f}/{q[1][c]:.0f}/{q[2][c]:.0f}")
    for c, name in enumerate(["CH3-CH2+5000/65536", "CH2/65536", "CH3/65536"]):
        print(f"  base-processed {name}: {base_lo[c]:.3f}..{base_hi[c]:.3f}")
    return images


def check_manifest(root, problems):
    rows = list(csv.DictReader((root / "manifest.csv").open()))
    lo, hi = np.full(3, 255), np.zeros(3, dtype=int)
    images = {}
    sizes = set()
    for row in rows:
        with Image.open(root / row["path"]) as im:
            if im.mode != "RGB":
                problems.append(f"{row['path']}: mode {im.mode}, expected RGB")
            array = np.asarray(im.convert("RGB"))
        sizes.add(array.shape)
        lo = np.minimum(lo, array.min(axis=(0, 1)))
        hi = np.maximum(hi, array.max(axis=(0, 1)))
        images.setdefault(row["label"], []).append(
            (row["patient"], array.transpose(2, 0, 1).astype(np.float32) / 255.0))
    patients = {r["patient"] for r in rows}
    print(f"manifest: {len(patients)} patients, {len(rows)} tiles, shapes {sorted(sizes)} uint8 RGB")
    print(f"  R {lo[0]}..{hi[0]}, G {lo[1]}..{hi[1]}, B {lo[2]}..{hi[2]}")
    return images


def montage(images, out, per_class=8):
    """One row per class; patches of different patients, as RGB (SRH: base-processed)."""
    rows = []
    for cls in sorted(images):
        by_patient = defaultdict(list)
        for patient, image in images[cls]:
            by_patient[patient].append(image)
        picked = []
        while len(picked) < per_class and any(by_patient.values()):
            for patient in sorted(by_patient):
                if by_patient[patient] and len(picked) < per_class:
                    picked.append(by_patient[patient].pop(0))
        tiles = [np.clip(t.transpose(1, 2, 0), 0, 1) for t in picked]
        pad = np.ones((tiles[0].shape[0], 2, 3), dtype=np.float32)
        rows.append(np.concatenate([x for t in tiles for x in (t, pad)], axis=1))
        print(f"  montage row {len(rows)}: {cls}")
    width = max(r.shape[1] for r in rows)
    rows = [np.pad(r, ((0, 2), (0, width - r.shape[1]), (0, 0)), constant_values=1.0) for r in rows]
    Image.fromarray((np.concatenate(rows) * 255).astype(np.uint8)).save(out)
    print(f"wrote {out}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dir", nargs="?", type=Path, help="an hsat synth output directory")
    parser.add_argument("--montage", type=Path, help="write a picture of patches by class")
    parser.add_argument("--write-tiff-fixture", type=Path, help="regenerate the TIFF unit-test fixture")
    args = parser.parse_args()
    if args.write_tiff_fixture:
        write_tiff_fixture(args.write_tiff_fixture)
        return 0
    if args.dir is None:
        parser.error("give an hsat synth output directory")
    root = args.dir
    if not (root / ".hsat-synth-complete").is_file():
        print(f"{root}: no .hsat-synth-complete marker: not a finished hsat synth output", file=sys.stderr)
        return 1
    problems = []
    if (root / "meta" / "opensrh.json").is_file():
        images = check_opensrh(root, problems)
    elif (root / "manifest.csv").is_file():
        images = check_manifest(root, problems)
    else:
        print(f"{root}: neither meta/opensrh.json nor manifest.csv", file=sys.stderr)
        return 1
    if args.montage:
        montage(images, args.montage)
    for problem in problems[:20]:
        print(f"PROBLEM {problem}", file=sys.stderr)
    print("ok" if not problems else f"{len(problems)} problems")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Trains a tiny class-conditional model for trying `pipeline serve` (standard library only).

Four classes of bright squares (one corner each) at 28x28 padded to 32x32, a 4-step VAE and a
4-step DiT with T = 1000: seconds on a CPU, useless pictures, every code path of the server.

    python3 scripts/tiny_model.py WORKDIR [--classes cat,dog,bird,horse]   # prints WORKDIR/ldm
"""

import argparse
import gzip
import os
import struct
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

VAE_CONFIG = """
[data]
source = "idx"
dir = "{data}"
resolution = 32
channels = 1

[vae]
downsample_factor = 4
latent_channels = 2
base_channels = 8
channel_mult = [1, 1, 2]
groups = 4

[train]
steps = 4
batch_size = 8
lr = 1e-3
warmup_steps = 1
log_every = 1
sample_every = 4
checkpoint_every = 4
"""

LDM_CONFIG = """
[schedule]
kind = "linear"
num_timesteps = 1000

[diffusion]
conditioning = "class"
ema_decay = 0.9

[backbone]
kind = "dit"
patch_size = 2
hidden_size = 32
depth = 1
num_heads = 2

[sampler]
kind = "ddim"
steps = 20

[train]
steps = 4
batch_size = 8
lr = 1e-3
warmup_steps = 1
log_every = 1
sample_every = 4
checkpoint_every = 4
"""

CLASSES = ["top-left", "top-right", "bottom-left", "bottom-right"]


def idx(dims, data):
    """An IDX file of unsigned bytes."""
    return bytes([0, 0, 0x08, len(dims)]) + b"".join(struct.pack(">I", d) for d in dims) + bytes(data)


def tiny_model(binary, work, classes=CLASSES):
    """Writes the data set and configs to `work`, trains, and returns `work/ldm`."""
    data = os.path.join(work, "data")
    os.makedirs(data, exist_ok=True)
    for prefix, count in (("train", 64), ("t10k", 16)):
        pixels, labels = [], []
        for i in range(count):
            label = i % 4
            ox, oy, size = 4 + 12 * (label % 2), 4 + 12 * (label // 2), 6 + (i * 7 % 5)
            for y in range(28):
                for x in range(28):
                    inside = ox <= x < ox + size and oy <= y < oy + size
                    pixels.append(200 + i % 50 if inside else i * 13 % 20)
            labels.append(label)
        with open(os.path.join(data, f"{prefix}-images-idx3-ubyte.gz"), "wb") as f:
            f.write(gzip.compress(idx([count, 28, 28], pixels)))
        with open(os.path.join(data, f"{prefix}-labels-idx1-ubyte.gz"), "wb") as f:
            f.write(gzip.compress(idx([count], labels)))
    with open(os.path.join(data, "classes.txt"), "w") as f:
        f.write("".join(c + "\n" for c in classes))
    with open(os.path.join(work, "vae.toml"), "w") as f:
        f.write(VAE_CONFIG.format(data=data))
    with open(os.path.join(work, "ldm.toml"), "w") as f:
        f.write(LDM_CONFIG)
    for args in (
        ["train-vae", "--config", "vae.toml", "--out", "vae"],
        ["train-ldm", "--config", "ldm.toml", "--vae", "vae", "--out", "ldm"],
    ):
        subprocess.run([binary, *args, "--device", "cpu"], cwd=work, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=300)
    return os.path.join(work, "ldm")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("work")
    p.add_argument("--classes", default=",".join(CLASSES), help="four comma-separated names")
    p.add_argument("--binary", default=os.path.join(ROOT, "target/release/pipeline"))
    a = p.parse_args()
    classes = a.classes.split(",")
    if len(classes) != 4:
        raise SystemExit(f"--classes {a.classes}: expected four names")
    print(tiny_model(a.binary, os.path.abspath(a.work), classes))


if __name__ == "__main__":
    main()

"""PyTorch side of crates/vae/examples/layer_probe.rs: the same layers, shapes and timing rule
(median of ITERS runs after one warm-up; forward, then forward + backward to the input's
gradient). A measurement aid only.

    python scripts/bench/layer_probe.py [iters] [threads]
"""
import sys
import time

import torch
import torch.nn.functional as F

SHAPES = [(32, 16, 32), (32, 32, 16), (32, 32, 8), (64, 64, 8), (64, 128, 4)]
ATTENTION_SHAPES = [(64, 64, 8), (64, 128, 4), (16, 128, 16)]
HEADS = 4


def self_attention(x):
    """Self-attention over the pixels of x [n, c, s, s], HEADS heads of c / HEADS."""
    n, c, h, w = x.shape
    t = x.reshape(n, HEADS, c // HEADS, h * w).transpose(2, 3)
    return F.scaled_dot_product_attention(t, t, t).transpose(2, 3).reshape(n, c, h, w)


def timed(iters, x, layer):
    g = torch.randn_like(layer(x))
    fwd, both = [], []
    for i in range(iters + 1):
        start = time.perf_counter()
        xg = x.clone().requires_grad_()
        y = layer(xg)
        t_fwd = (time.perf_counter() - start) * 1e3
        (y * g).sum().backward()
        _ = xg.grad
        if i > 0:
            fwd.append(t_fwd)
            both.append((time.perf_counter() - start) * 1e3)
    return sorted(fwd)[len(fwd) // 2], sorted(both)[len(both) // 2]


def main():
    iters = int(sys.argv[1]) if len(sys.argv) > 1 else 10
    if len(sys.argv) > 2:
        torch.set_num_threads(int(sys.argv[2]))
    torch.manual_seed(0)
    print(f"# PyTorch {torch.__version__}, cpu, {torch.get_num_threads()} threads, median of {iters} runs (ms)")
    print("layer batch channels side forward forward+backward")
    for n, c, side in SHAPES:
        x = torch.randn(n, c, side, side)
        conv = torch.nn.Conv2d(c, c, 3, padding=1)
        norm = torch.nn.GroupNorm(8 if c <= 32 else 32, c)
        for name, layer in [("conv3x3", conv), ("groupnorm-silu", lambda t: F.silu(norm(t)))]:
            fwd, both = timed(iters, x, layer)
            print(f"{name} {n} {c} {side} {fwd:.2f} {both:.2f}")
    for n, c, side in ATTENTION_SHAPES:
        fwd, both = timed(iters, torch.randn(n, c, side, side), self_attention)
        print(f"attention {n} {c} {side} {fwd:.2f} {both:.2f}")


if __name__ == "__main__":
    main()

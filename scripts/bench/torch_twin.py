#!/usr/bin/env python3
"""The PyTorch twin of `pipeline bench`: the same VAE, U-Net and DiT, shapes, losses and
optimizer in PyTorch eager, timed the same way. A measurement aid only; the product never uses it.

It reads the resolved settings that `pipeline bench --json FILE` writes (the `spec` key: every
config of every row, the noise schedule, the DDIM timesteps), so both sides always measure the
same work, and prints the same table and JSON.

    pipeline bench --config animals --json burn.json
    .venv/bin/python scripts/bench/torch_twin.py --spec burn.json --device cpu --json torch.json
    .venv/bin/python scripts/bench/torch_twin.py --spec burn.json --params-only

Layer by layer it follows crates/vae/src/{model,blocks}.rs, crates/diffusion/src/{unet,dit,
attention,embedding}.rs and the training steps of crates/pipeline/src/{vae_stage,ldm_stage,
train/trainer,ema}.rs. Differences, all idiomatic PyTorch: noise, timesteps and dropped labels
are drawn on the device (the Rust side draws them on the host so a seed gives the same numbers
on every backend), attention is F.scaled_dot_product_attention, and per-parameter gradient
clipping and the EMA use the foreach kernels.
"""

import argparse
import contextlib
import json
import math
import os
import sys
import time
import warnings

# torch warns once that NumPy is absent; the twin does not use it
warnings.filterwarnings("ignore", message="Failed to initialize NumPy")

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402


# ---------------------------------------------------------------- shared layers

def conv3x3(c_in, c_out, stride=1, zero=False):
    """3x3 conv, padding 1 (ldm_common::nn::conv3x3)."""
    conv = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1)
    if zero:
        nn.init.zeros_(conv.weight)
        nn.init.zeros_(conv.bias)
    return conv


def zero_linear(d_in, d_out):
    """attention::zero_linear: weight and bias start at 0."""
    lin = nn.Linear(d_in, d_out)
    nn.init.zeros_(lin.weight)
    nn.init.zeros_(lin.bias)
    return lin


def upsample_nearest2x(x):
    return F.interpolate(x, scale_factor=2, mode="nearest")


def timestep_embedding(t, dim, max_period=10_000.0):
    """[cos(t f_i), sin(t f_i)], f_i = max_period^(-i/half) (embedding::timestep_embedding)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=1)
    if dim % 2 == 1:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=1)
    return emb


class TimestepEmbedder(nn.Module):
    """Linear(SiLU(Linear(timestep_embedding(t))))."""

    def __init__(self, frequency_dim, dim):
        super().__init__()
        self.linear1 = nn.Linear(frequency_dim, dim)
        self.linear2 = nn.Linear(dim, dim)
        self.frequency_dim = frequency_dim

    def forward(self, t):
        return self.linear2(F.silu(self.linear1(timestep_embedding(t, self.frequency_dim))))


class LabelEmbedder(nn.Module):
    """(num_classes + 1) x dim table, N(0, 0.02^2); id num_classes is the null class."""

    def __init__(self, num_classes, dim):
        super().__init__()
        self.table = nn.Embedding(num_classes + 1, dim)
        nn.init.normal_(self.table.weight, std=0.02)

    def forward(self, labels):
        return self.table(labels)


class SelfAttention(nn.Module):
    """One fused q/k/v projection, heads laid out as attention::SelfAttention."""

    def __init__(self, dim, num_heads, zero_out):
        super().__init__()
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = zero_linear(dim, dim) if zero_out else nn.Linear(dim, dim)
        self.num_heads = num_heads

    def forward(self, x):
        b, n, d = x.shape
        h = self.num_heads
        # [b, n, 3d] -> [b, n, 3h, d/h] -> [b, 3h, n, d/h]
        qkv = self.qkv(x).reshape(b, n, 3 * h, d // h).transpose(1, 2)
        q, k, v = qkv[:, :h], qkv[:, h:2 * h], qkv[:, 2 * h:]
        o = F.scaled_dot_product_attention(q, k, v)
        return self.out(o.transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    """Linear -> GELU (exact, or the tanh approximation: `activation = "gelu-tanh"`) -> Linear."""

    def __init__(self, dim, hidden, approximate="none"):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.approximate = approximate

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate=self.approximate))


# ---------------------------------------------------------------- VAE (crates/vae)

class VaeResBlock(nn.Module):
    """x + conv(silu(norm(conv(silu(norm(x)))))), 1x1 conv on the skip when channels change."""

    def __init__(self, c_in, c_out, groups):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, c_in)
        self.conv1 = conv3x3(c_in, c_out)
        self.norm2 = nn.GroupNorm(groups, c_out)
        self.conv2 = conv3x3(c_out, c_out)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else None

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (self.skip(x) if self.skip is not None else x) + h


class Level(nn.Module):
    def __init__(self, blocks, resample):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.resample = resample


class Vae(nn.Module):
    def __init__(self, cfg, image_channels):
        super().__init__()
        ch = [m * cfg["base_channels"] for m in cfg["channel_mult"]]
        g, last, nres = cfg["groups"], len(ch) - 1, cfg["num_res_blocks"]
        lat = cfg["latent_channels"]
        c = ch[0]
        enc = []
        for i, c_out in enumerate(ch):
            blocks = []
            for _ in range(nres):
                blocks.append(VaeResBlock(c, c_out, g))
                c = c_out
            enc.append(Level(blocks, conv3x3(c, c, 2) if i < last else None))
        self.enc_conv_in = conv3x3(image_channels, ch[0])
        self.enc_levels = nn.ModuleList(enc)
        self.enc_mid = VaeResBlock(c, c, g)
        self.enc_norm_out = nn.GroupNorm(g, c)
        self.enc_conv_out = conv3x3(c, 2 * lat)
        dec = []
        for i in reversed(range(len(ch))):
            blocks = []
            for _ in range(nres):
                blocks.append(VaeResBlock(c, ch[i], g))
                c = ch[i]
            dec.append(Level(blocks, conv3x3(c, c, 1) if i > 0 else None))
        self.decoder = nn.ModuleDict({
            "conv_in": conv3x3(lat, ch[last]),
            "mid": VaeResBlock(ch[last], ch[last], g),
            "levels": nn.ModuleList(dec),
            "norm_out": nn.GroupNorm(g, c),
            "conv_out": conv3x3(c, image_channels),
        })

    def encode(self, x):
        h = self.enc_conv_in(x)
        for level in self.enc_levels:
            for block in level.blocks:
                h = block(h)
            if level.resample is not None:
                h = level.resample(h)
        h = self.enc_mid(h)
        h = self.enc_conv_out(F.silu(self.enc_norm_out(h)))
        mean, logvar = h.chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def decode(self, z):
        d = self.decoder
        h = d["mid"](d["conv_in"](z))
        for level in d["levels"]:
            for block in level.blocks:
                h = block(h)
            if level.resample is not None:
                h = level.resample(upsample_nearest2x(h))
        return d["conv_out"](F.silu(d["norm_out"](h)))

    def loss(self, x, eps, cfg):
        """recon(x, decode(mu + sigma eps)) + beta KL(q(z|x) || N(0, I)) (Vae::loss)."""
        mean, logvar = self.encode(x)
        z = mean + torch.exp(0.5 * logvar) * eps
        x_hat = self.decode(z)
        diff = x_hat - x
        recon = diff.abs().mean() if cfg["reconstruction"] == "l1" else diff.pow(2).mean()
        kl = (0.5 * (mean.pow(2) + logvar.exp() - logvar - 1.0)).mean()
        return recon + kl * cfg["kl_weight"]


# ---------------------------------------------------------------- U-Net (unet.rs)

class UNetResBlock(nn.Module):
    """x + conv(dropout(silu(norm(conv(silu(norm(x))) + proj(emb))))), last conv zero."""

    def __init__(self, c_in, c_out, emb_dim, groups, dropout):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, c_in)
        self.conv1 = conv3x3(c_in, c_out)
        self.emb_proj = nn.Linear(emb_dim, c_out)
        self.norm2 = nn.GroupNorm(groups, c_out)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = conv3x3(c_out, c_out, zero=True)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else None

    def forward(self, x, emb):
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.emb_proj(emb)[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return (self.skip(x) if self.skip is not None else x) + h


class SpatialAttention(nn.Module):
    """x + SelfAttn(GN(x)) over the pixels, output projection zero."""

    def __init__(self, channels, num_heads, groups):
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels)
        self.attn = SelfAttention(channels, num_heads, zero_out=True)

    def forward(self, x):
        b, c, h, w = x.shape
        tokens = self.norm(x).reshape(b, c, h * w).transpose(1, 2)
        a = self.attn(tokens)
        return x + a.transpose(1, 2).reshape(b, c, h, w)


class UNetBlock(nn.Module):
    def __init__(self, res, attn):
        super().__init__()
        self.res = res
        self.attn = attn

    def forward(self, x, emb):
        h = self.res(x, emb)
        return self.attn(h) if self.attn is not None else h


class UNet(nn.Module):
    def __init__(self, cfg, latent_channels, num_classes):
        super().__init__()
        ch = [m * cfg["base_channels"] for m in cfg["channel_mult"]]
        emb_dim = 4 * cfg["base_channels"]
        g, heads, drop, nres = cfg["groups"], cfg["num_heads"], cfg["dropout"], cfg["num_res_blocks"]

        def block(c_in, c_out, level):
            attn = SpatialAttention(c_out, heads, g) if level in cfg["attention_levels"] else None
            return UNetBlock(UNetResBlock(c_in, c_out, emb_dim, g, drop), attn)

        c = ch[0]
        skips = [c]
        down = []
        for i, c_out in enumerate(ch):
            blocks = []
            for _ in range(nres):
                blocks.append(block(c, c_out, i))
                c = c_out
                skips.append(c)
            ds = conv3x3(c, c, 2) if i + 1 < len(ch) else None
            if ds is not None:
                skips.append(c)
            down.append(nn.ModuleDict({"blocks": nn.ModuleList(blocks), **({"down": ds} if ds is not None else {})}))
        self.mid_res1 = UNetResBlock(c, c, emb_dim, g, drop)
        self.mid_attn = SpatialAttention(c, heads, g)
        self.mid_res2 = UNetResBlock(c, c, emb_dim, g, drop)
        up = []
        for i in reversed(range(len(ch))):
            blocks = []
            for _ in range(nres + 1):
                skip = skips.pop()
                blocks.append(block(c + skip, ch[i], i))
                c = ch[i]
            us = conv3x3(c, c, 1) if i > 0 else None
            up.append(nn.ModuleDict({"blocks": nn.ModuleList(blocks), **({"up": us} if us is not None else {})}))
        self.time_embed = TimestepEmbedder(cfg["base_channels"], emb_dim)
        self.label_embed = LabelEmbedder(num_classes, emb_dim) if num_classes else None
        self.conv_in = conv3x3(latent_channels, ch[0])
        self.down = nn.ModuleList(down)
        self.up = nn.ModuleList(up)
        self.norm_out = nn.GroupNorm(g, c)
        self.conv_out = conv3x3(c, latent_channels, zero=True)

    def forward(self, z, t, y):
        emb = self.time_embed(t)
        if self.label_embed is not None:
            emb = emb + self.label_embed(y)
        emb = F.silu(emb)
        h = self.conv_in(z)
        skips = [h]
        for level in self.down:
            for blk in level["blocks"]:
                h = blk(h, emb)
                skips.append(h)
            if "down" in level:
                h = level["down"](h)
                skips.append(h)
        h = self.mid_res2(self.mid_attn(self.mid_res1(h, emb)), emb)
        for level in self.up:
            for blk in level["blocks"]:
                h = blk(torch.cat([h, skips.pop()], dim=1), emb)
            if "up" in level:
                h = level["up"](upsample_nearest2x(h))
        return self.conv_out(F.silu(self.norm_out(h)))


# ---------------------------------------------------------------- DiT (dit.rs)

def sincos_2d(dim, grid):
    """MAE / DiT 2-D sin-cos positions: [sin, cos] of the column, then of the row."""
    quarter = dim // 4
    k = torch.arange(quarter, dtype=torch.float64)
    w = 10_000.0 ** (-k / quarter)
    rows = []
    for row in range(grid):
        for col in range(grid):
            parts = []
            for pos in (col, row):
                a = pos * w
                parts += [torch.sin(a), torch.cos(a)]
            rows.append(torch.cat(parts))
    return torch.stack(rows).float()[None]


def modulate(x, shift, scale):
    return x * (1 + scale[:, None]) + shift[:, None]


def plain_layer_norm(x):
    return F.layer_norm(x, (x.shape[-1],), eps=1e-6)


class DiTBlock(nn.Module):
    """adaLN-Zero: six vectors from c shift, scale and gate attention and MLP."""

    def __init__(self, dim, heads, mlp_hidden, approximate="none"):
        super().__init__()
        self.attn = SelfAttention(dim, heads, zero_out=False)
        self.mlp = Mlp(dim, mlp_hidden, approximate)
        self.ada_ln = zero_linear(dim, 6 * dim)

    def forward(self, x, c):
        sm, cm, gm, sp, cp, gp = self.ada_ln(c).chunk(6, dim=1)
        x = x + gm[:, None] * self.attn(modulate(plain_layer_norm(x), sm, cm))
        return x + gp[:, None] * self.mlp(modulate(plain_layer_norm(x), sp, cp))


class DiT(nn.Module):
    def __init__(self, cfg, latent_channels, latent_size, num_classes):
        super().__init__()
        d, p = cfg["hidden_size"], cfg["patch_size"]
        grid = latent_size // p
        self.x_embedder = nn.Conv2d(latent_channels, d, p, stride=p)
        if cfg["pos_embed"] == "sincos":
            self.pos_embed = nn.Parameter(sincos_2d(d, grid), requires_grad=False)
        else:
            self.pos_embed = nn.Parameter(torch.randn(1, grid * grid, d) * 0.02)
        self.t_embedder = TimestepEmbedder(256, d)
        self.y_embedder = LabelEmbedder(num_classes, d) if num_classes else None
        hidden = int(round(d * cfg["mlp_ratio"]))
        approximate = "tanh" if cfg.get("activation", "gelu") == "gelu-tanh" else "none"
        self.blocks = nn.ModuleList(
            DiTBlock(d, cfg["num_heads"], hidden, approximate) for _ in range(cfg["depth"]))
        self.final_ada_ln = zero_linear(d, 2 * d)
        self.final_linear = zero_linear(d, p * p * latent_channels)
        self.p, self.ch = p, latent_channels

    def forward(self, z, t, y):
        b, _, h, w = z.shape
        p = self.p
        gh, gw = h // p, w // p
        x = self.x_embedder(z)
        d = x.shape[1]
        x = x.reshape(b, d, gh * gw).transpose(1, 2) + self.pos_embed
        c = self.t_embedder(t)
        if self.y_embedder is not None:
            c = c + self.y_embedder(y)
        c = F.silu(c)
        for blk in self.blocks:
            x = blk(x, c)
        shift, scale = self.final_ada_ln(c).chunk(2, dim=1)
        x = self.final_linear(modulate(plain_layer_norm(x), shift, scale))
        return x.reshape(b, gh, gw, p, p, self.ch).permute(0, 5, 1, 3, 2, 4).reshape(b, self.ch, h, w)


def build_backbone(spec):
    c, s, _ = spec["latent_shape"]
    b = spec["backbone"]
    if b["kind"] == "unet":
        return UNet(b, c, spec["num_classes"])
    return DiT(b, c, s, spec["num_classes"])


def count(module):
    return sum(p.numel() for p in module.parameters())


# ---------------------------------------------------------------- training and timing

def foreach_of(train):
    """`train.foreach` as PyTorch's optimizer argument: None (auto), True (on), False (off)."""
    return {"auto": None, "on": True, "off": False}[train.get("foreach", "auto")]


class Trainer:
    """AdamW as train::train builds it (burn's betas and eps, the run's weight decay) with
    per-parameter gradient-norm clipping (burn's GradientClipping::Norm), constant lr."""

    def __init__(self, model, train):
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.clip = train["grad_clip"]
        self.lr = train["lr"]
        # train.foreach: auto is PyTorch's own default (foreach kernels on CUDA), as in burn
        self.foreach = foreach_of(train)
        self.opt = torch.optim.AdamW(self.params, lr=self.lr, betas=(0.9, 0.999), eps=1e-5,
                                     weight_decay=train["weight_decay"], foreach=self.foreach)

    def step(self, loss, clock):
        clock.lap("forward_ms")
        loss.backward()
        clock.lap("backward_ms")
        if self.clip > 0:
            grads = [p.grad for p in self.params]
            tiny = torch.finfo(torch.float32).tiny
            if self.foreach is False:
                for g in grads:
                    g.mul_(torch.clamp(self.clip / (g.norm() + tiny), max=1.0))
            else:
                norms = torch._foreach_norm(grads)
                coefs = [torch.clamp(self.clip / (n + tiny), max=1.0) for n in norms]
                torch._foreach_mul_(grads, coefs)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        clock.lap("optimizer_ms")


def fence(value, device):
    """Wait for the queued work: read a value back, and synchronize CUDA."""
    out = float(value.item())
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return out


class Clock:
    """`pipeline bench --phases`: the time of each part of a training step (forward,
    backward, optimizer, EMA), with the device synchronized after each part; off: no syncs."""

    PARTS = ("forward_ms", "backward_ms", "optimizer_ms", "ema_ms")

    def __init__(self, device, enabled):
        self.device, self.enabled, self.on = device, enabled, False
        self.seconds = dict.fromkeys(self.PARTS, 0.0)
        self.mark = 0.0

    def start(self):
        if self.on:
            self.mark = time.perf_counter()

    def lap(self, part):
        if self.on:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            now = time.perf_counter()
            self.seconds[part] += now - self.mark
            self.mark = now

    def per_step(self, iters):
        return {k: 1000.0 * v / iters for k, v in self.seconds.items()} if self.enabled else None


def time_training(step_fn, warmup, iters, device, phases=False):
    """Seconds of `iters` timed steps after `warmup` untimed ones, the last loss, and with
    `phases` the ms per step of each part."""
    clock = Clock(device, phases)
    loss = None
    for i in range(warmup):
        loss = step_fn(i, clock)
    if loss is not None:
        fence(loss, device)
    clock.on = phases
    start = time.perf_counter()
    for i in range(warmup, warmup + iters):
        clock.start()
        loss = step_fn(i, clock)
    last = fence(loss, device)
    return time.perf_counter() - start, last, clock.per_step(iters)


def row(name, model, batch, params, iters, seconds, unit, loss=None, per_step=None, items=None,
        phases=None):
    return {**({"phases": phases} if phases else {}),
        "name": name, "model": model, "batch": batch, "params": params, "iters": iters,
        "seconds": seconds,
        "ms_per_step": per_step if per_step is not None else 1000.0 * seconds / iters,
        "items_per_s": items if items is not None else batch * iters / seconds,
        "unit": unit, **({"last_loss": loss} if loss is not None else {}),
    }


def autocast(train, device):
    """`train.precision = "bf16"`: PyTorch's automatic mixed precision (f32 weights, bf16
    compute where autocast allows it), the counterpart of the Rust side's bf16 weight casts."""
    if train.get("precision", "f32") == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def bench(spec, device, gen):
    iters, warmup = spec["iters"], spec["warmup"]
    rows = []
    v = spec["vae"]
    c_img, res, _ = v["image_shape"]
    lc, ls, _ = v["latent_shape"]
    bv = v["batch_size"]
    vae = Vae(v["config"], c_img).to(device)
    trainer = Trainer(vae, v["train"])
    host_images = (torch.rand(bv, c_img, res, res, generator=gen) * 2 - 1).pin_memory() \
        if device.type == "cuda" else torch.rand(bv, c_img, res, res, generator=gen) * 2 - 1

    def vae_step(_, clock):
        x = host_images.to(device, non_blocking=True)
        eps = torch.randn(bv, lc, ls, ls, device=device)
        with autocast(v["train"], device):
            loss = vae.loss(x, eps, v["config"])
        loss = loss.float()
        trainer.step(loss, clock)
        return loss.detach()

    phases = spec.get("phases", False)
    seconds, loss, parts = time_training(vae_step, warmup, iters, device, phases)
    if parts:
        parts["ema_ms"] = 0.0
    rows.append(row("vae-train", f"VAE ({v['source']})", bv, count(vae), iters, seconds, "images", loss,
                    phases=parts))

    trained = {}
    for s in spec["ldm"]:
        model = build_backbone(s).to(device)
        ema = build_backbone(s).to(device)
        ema.load_state_dict(model.state_dict())
        ema.requires_grad_(False)
        trainer = Trainer(model, s["train"])
        b = s["batch_size"]
        c, h, w = s["latent_shape"]
        T = len(s["alphas_cumprod"])
        ab = torch.tensor(s["alphas_cumprod"], device=device, dtype=torch.float32)
        ab_floor = torch.tensor(s["alpha_bar"], device=device, dtype=torch.float32)
        dif = s["diffusion"]
        ncls = s["num_classes"]
        host_latents = torch.rand(b, c, h, w, generator=gen) * 2 - 1
        if device.type == "cuda":
            host_latents = host_latents.pin_memory()
        labels = (torch.arange(b, device=device) % ncls) if ncls else None
        model_params = list(model.parameters())
        ema_params = list(ema.parameters())

        def ldm_step(step, clock, model=model, ema=ema, trainer=trainer, b=b, c=c, h=h, w=w, T=T, ab=ab,
                     ab_floor=ab_floor, dif=dif, ncls=ncls, host_latents=host_latents, labels=labels,
                     model_params=model_params, ema_params=ema_params):
            z0 = host_latents.to(device, non_blocking=True)
            t = torch.randint(0, T, (b,), device=device)
            eps = torch.randn(b, c, h, w, device=device)
            a = ab[t].sqrt()[:, None, None, None]
            sg = (1 - ab[t]).sqrt()[:, None, None, None]
            z_t = a * z0 + sg * eps
            y = None
            if ncls:
                drop = torch.rand(b, device=device) < dif["p_uncond"]
                y = torch.where(drop, torch.full_like(labels, ncls), labels)
            with autocast(s["train"], device):
                out = model(z_t, t.float(), y)
            out = out.float()
            p = dif["parameterization"]
            if p == "epsilon":
                target = eps
            elif p == "sample":
                target = z0
            else:
                af = ab_floor[t].sqrt()[:, None, None, None]
                sf = (1 - ab_floor[t]).sqrt()[:, None, None, None]
                target = eps * af - z0 * sf
            mse = (out - target).pow(2).mean(dim=(1, 2, 3))
            if dif["loss"]["kind"] == "min-snr":
                g = dif["loss"].get("gamma", 5.0)
                snr = ab[t] / (1 - ab[t])
                if p == "epsilon":
                    wgt = torch.clamp(g / snr, max=1.0)
                elif p == "sample":
                    wgt = torch.clamp(snr, max=g)
                else:
                    wgt = torch.clamp(snr, max=g) / (snr + 1)
                loss = (mse * wgt).mean()
            else:
                loss = mse.mean()
            trainer.step(loss, clock)
            decay = min(dif["ema_decay"], (1 + step) / (10 + step))
            with torch.no_grad():
                if trainer.foreach is False:
                    for e, p in zip(ema_params, model_params):
                        e.lerp_(p, 1 - decay)
                else:
                    torch._foreach_lerp_(ema_params, model_params, 1 - decay)
            clock.lap("ema_ms")
            return loss.detach()

        seconds, loss, parts = time_training(ldm_step, warmup, iters, device, phases)
        rows.append(row(s["row"], s["label"], b, count(model), iters, seconds, "latents", loss,
                        phases=parts))
        trained[s["row"]] = (ema, s)

    smp = spec["sample"]
    ema, s = trained[smp["ldm_row"]]
    ema.eval()
    vae.eval()
    n, cfg, ts = smp["n"], smp["cfg"], smp["timesteps"]
    c, h, w = s["latent_shape"]
    ncls = s["num_classes"]
    abf = s["alpha_bar"]
    p = s["diffusion"]["parameterization"]

    def to_eps(z, out, t):
        a, sg = math.sqrt(abf[t]), math.sqrt(1 - abf[t])
        if p == "epsilon":
            return out
        if p == "sample":
            return (z - out * a) / sg
        return z * sg + out * a

    # `sampler.precision = "bf16"`: the network under autocast, the sampler's updates and the
    # decode in f32, as the Rust side casts the weights and hands back f32
    net_precision = {"precision": smp.get("precision", "f32")}

    def net(z, t, y):
        with autocast(net_precision, device):
            return ema(z, t, y).float()

    @torch.inference_mode()
    def sample_once():
        x = torch.randn(n, c, h, w, device=device)
        y = (torch.arange(n, device=device) % ncls) if ncls else None
        guided = ncls and cfg != 1.0
        both = torch.cat([torch.full_like(y, ncls), y]) if guided else None
        for i, t in enumerate(ts):
            ab_t = abf[t]
            ab_s = abf[ts[i + 1]] if i + 1 < len(ts) else 1.0
            if guided:
                z2 = torch.cat([x, x])
                out = net(z2, torch.full((2 * n,), float(t), device=device), both)
                e = to_eps(z2, out, t)
                u, cnd = e[:n], e[n:]
                eps = u + (cnd - u) * cfg
            else:
                eps = to_eps(x, net(x, torch.full((n,), float(t), device=device), y), t)
            x0 = (x - math.sqrt(1 - ab_t) * eps) / math.sqrt(ab_t)
            x = x0 * math.sqrt(ab_s) + eps * math.sqrt(max(1 - ab_s, 0.0))
        images = vae.decode(x / 1.0).clamp(-1, 1)
        return fence(images.sum(), device)

    if warmup > 0:
        sample_once()
    runs = spec["sample_runs"]
    start = time.perf_counter()
    for _ in range(runs):
        sample_once()
    seconds = time.perf_counter() - start
    per_run = seconds / runs
    kind = "U-Net" if s["backbone"]["kind"] == "unet" else "DiT"
    rows.append(row("sample-ddim50", f"{kind} DDIM {len(ts)}, cfg {cfg:g}, + VAE decode", n,
                    count(ema) + count(vae.decoder), runs, seconds, "images",
                    per_step=1000.0 * per_run / len(ts), items=n / per_run))
    return rows


def params_only(spec):
    """Parameter count of every row's network(s), built on the CPU."""
    v = spec["vae"]
    vae = Vae(v["config"], v["image_shape"][0])
    out = {"vae-train": count(vae)}
    for s in spec["ldm"]:
        out[s["row"]] = count(build_backbone(s))
    smp = spec["sample"]
    sampled = next(s for s in spec["ldm"] if s["row"] == smp["ldm_row"])
    out[smp["row"]] = count(build_backbone(sampled)) + count(vae.decoder)
    return out


def flops_only(spec):
    """Matrix-product FLOPs of one latent's forward pass through every DiT row's network, as
    torch.utils.flop_counter counts them (attention on the math kernel, which it can count)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode
    out = {}
    for s in spec["ldm"]:
        if s["backbone"]["kind"] != "dit":
            continue
        model = build_backbone(s)
        c, h, w = s["latent_shape"]
        y = torch.zeros(1, dtype=torch.long) if s["num_classes"] else None
        with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
            model(torch.randn(1, c, h, w), torch.zeros(1), y)
        out[s["row"]] = counter.get_total_flops()
    return out


def thousands(n):
    return f"{n:,}"


def table(report):
    spec_line = (f"torch_twin: {report['config']} on {report['device']}; {report['iters']} timed iterations "
                 f"after {report['warmup']} warm-up (sampling: {report['sample_runs']} runs)")
    lines = [spec_line, f"{'row':<15} {'batch':>6} {'params':>11} {'ms/step':>10} {'items/s':>10}  {'unit':<8} model"]
    for r in report["rows"]:
        lines.append(f"{r['name']:<15} {r['batch']:>6} {thousands(r['params']):>11} {r['ms_per_step']:>10.2f} "
                     f"{r['items_per_s']:>10.1f}  {r['unit']:<8} {r['model']}")
    if any("phases" in r for r in report["rows"]):
        lines.append("parts of a training step (--phases: ms per step, the device synced after each part)")
        lines.append(f"{'row':<15} {'forward':>16} {'backward':>16} {'optimizer':>16} {'ema':>16} {'sum':>9}")
        for r in report["rows"]:
            p = r.get("phases")
            if not p:
                continue
            total = sum(p[k] for k in Clock.PARTS)
            cells = [f"{p[k]:.2f} ({100 * p[k] / total:.0f}%)" for k in Clock.PARTS]
            lines.append(f"{r['name']:<15} " + " ".join(f"{c:>16}" for c in cells) + f" {total:>9.2f}")
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--spec", required=True, help="JSON written by `pipeline bench --json`")
    ap.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="CPU threads (torch.set_num_threads)")
    ap.add_argument("--json", help="also write the rows as JSON to this file")
    ap.add_argument("--params-only", action="store_true", help="print the parameter counts as JSON and exit")
    ap.add_argument("--flops-only", action="store_true",
                    help="print the DiT rows' forward FLOPs per latent (torch's flop counter) as JSON and exit")
    args = ap.parse_args()
    try:
        with open(args.spec) as f:
            report = json.load(f)
        spec = report["spec"]
    except (OSError, ValueError, KeyError) as e:
        sys.exit(f"error: --spec {args.spec}: expected the JSON of `pipeline bench --json` ({e})")
    if args.params_only:
        print(json.dumps(params_only(spec)))
        return
    if args.flops_only:
        print(json.dumps(flops_only(spec)))
        return
    if args.threads < 1:
        sys.exit(f"error: --threads {args.threads}: expected at least 1")
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            sys.exit(f"error: --device {args.device}: torch sees no CUDA device")
        torch.backends.cudnn.benchmark = True
        name = f"{args.device} ({torch.cuda.get_device_name(device)}, PyTorch {torch.__version__})"
    else:
        name = f"cpu (PyTorch {torch.__version__}, {torch.get_num_threads()} threads)"
    torch.manual_seed(spec["seed"])
    gen = torch.Generator().manual_seed(spec["seed"])
    rows = bench(spec, device, gen)
    out = {"tool": f"torch_twin.py (PyTorch {torch.__version__} eager)", "device": name,
           "config": report.get("config", "?"), "iters": spec["iters"], "warmup": spec["warmup"],
           "sample_runs": spec["sample_runs"], "rows": rows}
    print(table(out), end="")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
        print(f"wrote {args.json}", file=sys.stderr)


if __name__ == "__main__":
    main()

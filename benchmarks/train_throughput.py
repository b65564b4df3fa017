"""Training throughput: ddpm_lib's U-Net against diffusers' UNet2DModel of the same size.

Both networks get the same architecture family (Ho et al.'s U-Net: residual blocks, attention at one
resolution and in the middle), the same resolution, batch and optimiser; diffusers' widths are
chosen so that its parameter count is within 10 % of ours. One training step is forward, the
epsilon loss, backward and an AdamW step. Steps of the two models alternate after warm-up; the
table reports the median of the repeated steps. On a GPU, bf16 and torch.compile variants run too.

    python benchmarks/train_throughput.py                 # CPU, 28x28 and 32x32
    python benchmarks/train_throughput.py --device cuda   # adds bf16 and compile

diffusers is a benchmark-only dependency: pip install -r benchmarks/requirements.txt
"""

from __future__ import annotations

import argparse
import statistics
import time
from contextlib import nullcontext

import torch
import torch.nn.functional as F

from ddpm_lib.models import UNet, count_parameters


def our_unet(resolution: int, channels: int, base: int) -> torch.nn.Module:
    attention = resolution // 4  # attention at the third level, as in the MNIST defaults
    return UNet(
        in_channels=channels,
        image_size=resolution,
        base_channels=base,
        channel_mult=(1, 2, 2),
        num_res_blocks=2,
        attention_resolutions=(attention,),
        dropout=0.0,
        num_groups=32,
    )


def diffusers_unet(resolution: int, channels: int, base: int) -> torch.nn.Module:
    from diffusers import UNet2DModel

    widths = (base, 2 * base, 2 * base)
    return UNet2DModel(
        sample_size=resolution,
        in_channels=channels,
        out_channels=channels,
        layers_per_block=2,
        block_out_channels=widths,
        norm_num_groups=32,
        down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
        attention_head_dim=widths[-1],
        dropout=0.0,
    )


class DiffusersAsEps(torch.nn.Module):
    """diffusers returns an output object; the trainer wants the tensor."""

    def __init__(self, net: torch.nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.net(x, t).sample


def matched_diffusers(resolution: int, channels: int, target: int) -> torch.nn.Module:
    """The diffusers U-Net whose width (a multiple of 32) brings it closest to ``target`` params."""
    best = min(
        (abs(count_parameters(diffusers_unet(resolution, channels, b)) - target), b)
        for b in range(32, 257, 32)
    )
    return DiffusersAsEps(diffusers_unet(resolution, channels, best[1]))


def make_step(model, device, amp_dtype, compile_model):
    net = torch.compile(model) if compile_model else model
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    autocast = (lambda: torch.autocast(device.type, dtype=amp_dtype)) if amp_dtype else nullcontext

    def step(x0, t, noise):
        with autocast():
            x_t = x0 + noise  # the closed form's cost is negligible; keep both models equal
            loss = F.mse_loss(net(x_t, t).float(), noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def time_pair(steps, batch, resolution, channels, device, warmup, repeats):
    g = torch.Generator(device="cpu").manual_seed(0)
    x0 = torch.randn(batch, channels, resolution, resolution, generator=g).to(device)
    noise = torch.randn(x0.shape, generator=g).to(device)
    t = torch.randint(0, 1000, (batch,), generator=g).to(device)
    for _ in range(warmup):
        for step in steps:
            step(x0, t, noise)
    times = [[] for _ in steps]
    for _ in range(repeats):
        for i, step in enumerate(steps):  # alternate, so both see the same machine state
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            step(x0, t, noise)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[i].append(time.perf_counter() - start)
    return [batch / statistics.median(ts) for ts in times]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--resolutions", type=int, nargs="+", default=[28, 32])
    parser.add_argument("--channels", type=int, default=1)
    parser.add_argument("--base", type=int, default=None, help="our base width (default by device)")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    base = args.base or (64 if on_gpu else 32)
    batch = args.batch_size or (128 if on_gpu else 32)
    variants = [("fp32", None, False)]
    if on_gpu:
        variants += [("bf16", torch.bfloat16, False), ("bf16+compile", torch.bfloat16, True)]

    print(
        f"device {device}, torch {torch.__version__}, threads {torch.get_num_threads()}, "
        f"batch {batch}, median of {args.repeats} steps after {args.warmup} warm-up"
    )
    header = "| resolution | variant | params ours | params diffusers | img/s ours | img/s diffusers | ours / diffusers |"  # noqa: E501
    print(header)
    print("|" + "---|" * 7)
    for res in args.resolutions:
        for name, amp_dtype, compile_model in variants:
            torch.manual_seed(0)
            ours = our_unet(res, args.channels, base).to(device)
            theirs = matched_diffusers(res, args.channels, count_parameters(ours)).to(device)
            if on_gpu:
                ours = ours.to(memory_format=torch.channels_last)
                theirs = theirs.to(memory_format=torch.channels_last)
            p_ours, p_theirs = count_parameters(ours), count_parameters(theirs)
            assert abs(p_theirs / p_ours - 1) < 0.10, (p_ours, p_theirs)
            steps = [make_step(m, device, amp_dtype, compile_model) for m in (ours, theirs)]
            ips_ours, ips_theirs = time_pair(
                steps, batch, res, args.channels, device, args.warmup, args.repeats
            )
            print(
                f"| {res}x{res} | {name} | {p_ours / 1e6:.2f} M | {p_theirs / 1e6:.2f} M | "
                f"{ips_ours:.0f} | {ips_theirs:.0f} | {ips_ours / ips_theirs:.2f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()

"""Where a training step's time goes on a GPU: step time per wavelet-layer form, and top kernels.

    python -m benchmarks.gpu_profile --arch wave50 --size 256 --batch 96

Prints (and writes ``gpu_profile.md`` to ``--out``) the median train-step time of the network in
bf16 autocast + channels_last with the wavelet layer as a depthwise convolution and as banded
matrix products, then the 15 CUDA kernels that take most of one step's time.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

import models
from models.dwt import WaveletDownsample


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="wave50")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=96, help="images per step (32 normals x 3 classes)")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", default="results/benchmarks")
    return parser


def main(args: argparse.Namespace) -> None:
    device = torch.device("cuda")
    torch.backends.cudnn.benchmark = True
    lines = [f"# {args.arch}@{args.size}, batch {args.batch}, bf16 autocast, channels_last, "
             f"{torch.cuda.get_device_name()}", ""]
    model = models.create_model(args.arch, num_classes=3).to(device, memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, fused=True)
    images = torch.rand(args.batch, 3, args.size, args.size, device=device).contiguous(
        memory_format=torch.channels_last)
    labels = torch.randint(0, 3, (args.batch,), device=device)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits, _ = model(images)
        loss = torch.nn.functional.cross_entropy(logits.float(), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for impl in ("conv", "matmul"):
        for layer in model.modules():
            if isinstance(layer, WaveletDownsample):
                layer.impl = impl
        for _ in range(5):
            step()
        torch.cuda.synchronize()
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            step()
            torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        ms = 1000 * statistics.median(times)
        lines.append(f"- wavelet layer as {impl}: {ms:.1f} ms per step, {args.batch / ms * 1000:.0f} images/s")
        print(lines[-1], flush=True)
        if impl == "conv":
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                step()
                torch.cuda.synchronize()
            table = prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=15, max_name_column_width=70)
            lines += ["", "```", table, "```", ""]
            print(table, flush=True)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "gpu_profile.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main(get_args_parser().parse_args())

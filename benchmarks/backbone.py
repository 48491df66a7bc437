"""Backbone speed: wave18 / wave50 forward and train-step times, and the wavelet layer alone.

Prints (and writes to ``--out``) two Markdown tables of median times:

1. the DWT layer alone (forward + backward) for each implementation (``conv``, ``matmul``, the
   paper-style per-call matrix rebuild), in float32 and bfloat16 autocast, each in NCHW and
   channels_last;
2. each arch at ``--batch`` x ``--size``: inference forward and a full train step (forward,
   backward, SGD step), with the paper-style layer as the baseline and ours in float32,
   channels_last and bfloat16 autocast.

    python -m benchmarks.backbone                       # CPU, wave18 + wave50, batch 8, 256 px
    python -m benchmarks.backbone --device cuda --repeats 10
"""

from __future__ import annotations

import argparse
import contextlib

import torch

import models
from benchmarks.common import device_sync, markdown_table, median_seconds, system_info, write_results
from benchmarks.paper_style_dwt import PaperStyleDownsample
from common.runtime import bf16_available
from models.dwt import WaveletDownsample


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--archs", default="wave18,wave50")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--wavelet", default="bior2.2")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--repeats", type=int, default=5, help="timed runs; the median is reported")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--skip-dwt", action="store_true", help="skip the layer-alone table")
    parser.add_argument("--out", default="results/benchmarks", help="folder for backbone.md/json")
    return parser


def precision_context(device: torch.device, bf16: bool):
    if not bf16:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def variants(device: torch.device) -> list[tuple[str, str, bool, bool]]:
    """(label, layer kind, channels_last, bf16 autocast)."""
    rows = [("paper-style layer, fp32", "paper", False, False),
            ("ours, fp32", "ours", False, False),
            ("ours, fp32 channels_last", "ours", True, False)]
    if bf16_available(device):
        rows += [("ours, bf16 autocast", "ours", False, True),
                 ("ours, bf16 autocast channels_last", "ours", True, True)]
    return rows


def time_dwt(device, repeats, warmup, wavelet) -> list[list[object]]:
    rows = []
    x = torch.randn(8, 64, 128, 128, device=device)
    sync = device_sync(device)
    layers = {"paper-style": PaperStyleDownsample(wavelet),
              "conv": WaveletDownsample(wavelet, impl="conv").to(device),
              "matmul": WaveletDownsample(wavelet, impl="matmul").to(device)}
    modes = [("fp32", False, False), ("fp32 channels_last", True, False)]
    if bf16_available(device):
        modes += [("bf16 autocast", False, True), ("bf16 autocast channels_last", True, True)]
    for name, layer in layers.items():
        for mode, channels_last, bf16 in modes:
            if bf16 and name == "paper-style":
                continue  # its custom autograd function cannot run under autocast
            inp = x.contiguous(memory_format=torch.channels_last) if channels_last else x

            def step(layer=layer, inp=inp, bf16=bf16):
                xg = inp.detach().requires_grad_(True)
                with precision_context(device, bf16):
                    out = layer(xg)
                out.float().sum().backward()

            rows.append([name, mode, f"{median_seconds(step, repeats, warmup, sync) * 1e3:.1f}"])
    return rows


def time_arch(arch, args, device) -> list[list[object]]:
    rows = []
    sync = device_sync(device)
    x = torch.rand(args.batch, 3, args.size, args.size, device=device)
    labels = torch.randint(0, 3, (args.batch,), device=device)
    for label, kind, channels_last, bf16 in variants(device):
        layer = PaperStyleDownsample if kind == "paper" else WaveletDownsample
        torch.manual_seed(0)
        net = models.create_model(arch, wavelet=args.wavelet, downsample_layer=layer).to(device)
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        net = net.to(memory_format=fmt)
        inp = x.contiguous(memory_format=fmt)
        opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, weight_decay=3e-5)

        def forward(net=net, inp=inp, bf16=bf16):
            with torch.no_grad(), precision_context(device, bf16):
                net(inp)

        def train_step(net=net, inp=inp, bf16=bf16, opt=opt):
            opt.zero_grad(set_to_none=True)
            with precision_context(device, bf16):
                logits, _ = net(inp)
                loss = torch.nn.functional.cross_entropy(logits.float(), labels)
            loss.backward()
            opt.step()

        net.eval()
        t_fwd = median_seconds(forward, args.repeats, args.warmup, sync)
        net.train()
        t_step = median_seconds(train_step, args.repeats, args.warmup, sync)
        rows.append([arch, label, f"{t_fwd * 1e3:.0f}", f"{t_step * 1e3:.0f}",
                     f"{args.batch / t_step:.1f}"])
        print(markdown_table(["arch", "variant", "forward ms", "train step ms", "train img/s"],
                             rows[-1:]).splitlines()[-1], flush=True)
    return rows


def main(args: argparse.Namespace) -> None:
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else "cpu" if args.device == "auto" else args.device)
    info = {**system_info(device), "batch": args.batch, "size": args.size,
            "wavelet": args.wavelet, "repeats": args.repeats, "device": str(device)}
    print(info)
    if torch.backends.cudnn.is_available():
        torch.backends.cudnn.benchmark = True
    if not args.skip_dwt:
        header = ["layer", "precision", "fwd+bwd ms (8x64x128x128)"]
        rows = time_dwt(device, args.repeats, args.warmup, args.wavelet)
        print(markdown_table(header, rows), flush=True)
        write_results(args.out, f"dwt_{device.type}", header, rows, info)
    header = ["arch", "variant", "forward ms", "train step ms", "train img/s"]
    rows = []
    for arch in args.archs.split(","):
        rows += time_arch(arch, args, device)
    print(markdown_table(header, rows))
    print("written:", write_results(args.out, f"backbone_{device.type}", header, rows, info))


if __name__ == "__main__":
    main(get_args_parser().parse_args())

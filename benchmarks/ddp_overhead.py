"""What DDP costs a training step on one GPU: the same step with and without the DDP wrapper.

    python benchmarks/ddp_overhead.py --preset hybrid_sparse [--batch 24] [--steps 20] [--json FILE]

N GPUs reach N x (one GPU's tok/s on its share of the batch under DDP), less whatever all-reduce time the backward
does not hide. This measures the DDP part where only one GPU is at hand: a one-process NCCL group, the model
compiled around DDP as the trainer does it (Dynamo splits the graph at DDP's gradient buckets), against the plain
compiled step. --batch 24 is each GPU's share of the study's batch of 48 on two GPUs.
"""

from __future__ import annotations

import argparse
import json
import os

import torch
import torch.distributed as torch_dist

from hybridctl.core.lab.speed import benchmark_step, speed_configs


def step_ms(cfg, device, ddp: bool, steps: int, warmup: int) -> float:
    _, step = benchmark_step(cfg, device, ddp=ddp)
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(steps):
        step()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="hybrid_sparse")
    parser.add_argument("--batch", type=int, default=24)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--json", default="")
    args = parser.parse_args()
    (cfg,) = speed_configs([args.preset], [], args.overrides + [f"train.batch_size={args.batch}"])
    device = torch.device("cuda", 0)
    torch.cuda.set_device(device)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29511")
    torch_dist.init_process_group("nccl", rank=0, world_size=1, device_id=device)
    try:
        results = {}
        for name, ddp in (("plain", False), ("ddp", True)):
            results[name] = step_ms(cfg, device, ddp, args.steps, args.warmup)
            tokens = args.batch * cfg.train.seq_len
            print(f"{name:5s} {results[name]:7.2f} ms/step  {tokens / results[name] * 1000:,.0f} tok/s", flush=True)
        results["ddp_overhead"] = results["ddp"] / results["plain"] - 1
        print(f"DDP costs {100 * results['ddp_overhead']:.1f}% of a step on {torch.cuda.get_device_name()}")
    finally:
        torch_dist.destroy_process_group()
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "device": torch.cuda.get_device_name(), "torch": torch.__version__,
                       "results": results}, f, indent=1)


if __name__ == "__main__":
    main()

"""Step time and peak memory of causal LM fine-tuning (LoRA / full / QLoRA), head over every position vs
head only at target positions, at several sequence lengths. Each configuration runs in its own child
process (peak RSS is that process's), one after another.

    PYTHONPATH=src .venv/bin/python benchmarks/causal_train_step.py --base qwen2.5-coder-0.5b \
        --modes lora full --lengths 128 256 --batch 4 --steps 2

A step is one optimizer step over `--batch` sequences of exactly L tokens (one micro-batch), half prompt
and half target (the loss and the head-at-targets rows cover L/2 positions per sequence), under bf16
autocast. The first step is a warm-up and is not timed. Results: one JSON line per configuration on
stdout and in benchmarks/results/causal-train-<UTC time>.jsonl.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def one(args: argparse.Namespace) -> dict:
    import torch

    from sefusion.models import causal, causal_train
    from sefusion.models.encoder import configure_threads

    configure_threads()
    torch.manual_seed(0)
    base = causal.resolve_base(args.base, args.cache)
    cfg = causal_train.CausalTrainConfig(
        mode=args.mode,
        batch=args.batch,
        micro_batch=args.batch,
        max_len=args.length,
        precision=args.precision,
        head_at_targets=args.head == "targets",
        gradient_checkpointing=args.checkpointing,
    )
    model = causal_train._build_model(base, cfg, "cpu")
    model.train()
    opt, _ = causal_train._optimizer(model, cfg, 100)
    vocab = causal_train._unwrap(model).config.vocab_size
    half = args.length // 2
    enc = [(torch.randint(100, min(vocab, 30000), (args.length,)).tolist(), half) for _ in range(args.batch)]
    micro = [causal_train.collate(enc, 0)]
    times = []
    for _ in range(args.steps + 1):
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = causal_train._train_step(model, micro, cfg, "cpu")
        opt.step()
        times.append(time.perf_counter() - t0)
    return {
        "base": args.base,
        "mode": args.mode,
        "head": args.head,
        "length": args.length,
        "batch": args.batch,
        "precision": args.precision,
        "gradient_checkpointing": args.checkpointing,
        "step_s": [round(t, 2) for t in times[1:]],
        "median_step_s": round(statistics.median(times[1:]), 2),
        "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
        "loss": round(loss, 4),
        "threads": torch.get_num_threads(),
        "load_average": os.getloadavg(),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", default="qwen2.5-coder-0.5b")
    ap.add_argument("--cache", type=Path, default=None)
    ap.add_argument("--modes", nargs="+", default=["lora", "full"])
    ap.add_argument("--lengths", nargs="+", type=int, default=[128, 256])
    ap.add_argument("--heads", nargs="+", default=["all", "targets"])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--precision", default="bf16")
    ap.add_argument("--checkpointing", action="store_true")
    ap.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--mode", default="lora", help=argparse.SUPPRESS)
    ap.add_argument("--length", type=int, default=128, help=argparse.SUPPRESS)
    ap.add_argument("--head", default="targets", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one(args)))
        return
    out = HERE / "results" / f"causal-train-{dt.datetime.now(dt.timezone.utc):%Y%m%dT%H%M%SZ}.jsonl"
    common = [
        "--base",
        args.base,
        "--batch",
        str(args.batch),
        "--steps",
        str(args.steps),
        "--precision",
        args.precision,
    ]
    common += ["--cache", str(args.cache)] if args.cache else []
    common += ["--checkpointing"] if args.checkpointing else []
    for mode in args.modes:
        for length in args.lengths:
            for head in args.heads:
                cmd = [
                    sys.executable,
                    __file__,
                    "--one",
                    "--mode",
                    mode,
                    "--length",
                    str(length),
                    "--head",
                    head,
                ]
                done = subprocess.run(cmd + common, capture_output=True, text=True)
                lines = done.stdout.strip().splitlines()
                row = (
                    json.loads(lines[-1])
                    if done.returncode == 0 and lines
                    else {
                        "base": args.base,
                        "mode": mode,
                        "head": head,
                        "length": length,
                        "error": (done.stderr.strip().splitlines() or ["failed"])[-1],
                    }
                )
                row["command"] = " ".join(["benchmarks/causal_train_step.py", *cmd[3:], *common])
                print(json.dumps(row), flush=True)
                with open(out, "a") as f:
                    f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()

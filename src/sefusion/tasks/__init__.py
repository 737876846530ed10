"""Software-engineering tasks: code corpora, task builders and metrics.

Corpora (`sefusion.tasks.corpus`): `load_corpus`, `split_by_file`, `dedupe`, `Function`, `Corpus`;
`sefusion.tasks.corpus_debian.fetch` gets the non-Python sources.

Tasks (`sefusion.tasks.base`): `get_task("defect-python") -> (TaskSpec, lang)`, `build_task(name, sizes=,
seed=, cache=, dirs=)` -> `TaskData` (cached as JSONL.gz under CACHE/tasks/), `score(spec, predictions,
examples)`, `mrr(similarity, gold)`, `Sizes`, `Example`, `TASKS`. One module per task kind registers it:

- `search`      docstring first sentence -> function code, MRR over a pool of up to 1,000 (retrieval);
- `defect`      original vs one injected bug (unbound name, swapped arguments, wrong return, undefined
                call), accuracy and accuracy per bug kind;
- `clone`       function + renamed/reformatted copy of itself or of another function, accuracy;
- `consistency` doc comment + code, own or another function's doc, accuracy;
- `naming`      code with its own name or another function's (an inconsistent method name), accuracy;
- `langid`      code -> one of six languages (`langid-multi`), accuracy;
- `exception`   code with its raised type masked -> the type (Python, Java, PHP), accuracy.

Generative tasks for causal LMs (`sefusion.tasks.generative`, a registry of their own: `get_task`
refuses them): `generate-python`, `summarize-LANG`, `repair-LANG`, `complete-LANG` and `translate`
(`build_generative`, `score_generative`, `per_example_scores`; metrics in `textmetrics`).

`_code` (lexer and per-function analysis) and `_mutate` (bugs, clone rewrites, exception masking) are the
shared machinery. Importing this package imports nothing heavy.
"""

"""Software-engineering tasks: code corpora (`corpus`), task builders and metrics.

`sefusion.tasks.corpus` is the entry point for corpora: `load_corpus`, `split_by_file`, `dedupe`,
`Function`, `Corpus`; `sefusion.tasks.corpus_debian.fetch` gets the non-Python sources.
"""

"""Generative evaluation: HumanEval-format problems, completions scored in the sandbox, code quality."""

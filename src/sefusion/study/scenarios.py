"""The seed study's three scenarios (Qiu et al., "One Size Does Fit All"), and user-defined ones from YAML.

- `languages`: one task kind in all six languages (fusing languages within one task);
- `same-category`: the classification tasks of one language (fusing tasks of one category);
- `cross-category`: retrieval and classification tasks spread over languages;
- `pair`: two tasks, for the methods that merge two models (PLeaS).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import SefusionError

LANGUAGES = ("go", "java", "javascript", "php", "python", "ruby")
# `defect` (injected bugs) is a task but not in the built-in scenarios: its expert stays at chance at the
# `full` budget on this base (results/README.md), and an expert at chance makes normalized scores
# meaningless; `naming` (inconsistent method names) is the defect kind the base learns.
CLASSIFICATION_KINDS = ("naming", "clone", "consistency", "exception")
CROSS_CATEGORY = ("search-go", "naming-python", "consistency-java", "clone-javascript", "langid-multi")
PAIR = ("consistency-python", "naming-python")


class StudyError(SefusionError, ValueError):
    """A study cannot run as asked: unknown scenario, bad task list, missing experts."""


@dataclass(frozen=True)
class Scenario:
    name: str
    tasks: tuple[str, ...]
    description: str
    options: dict[str, Any] = field(default_factory=dict)


def languages(kind: str = "search") -> Scenario:
    return Scenario(
        "languages",
        tuple(f"{kind}-{lang}" for lang in LANGUAGES),
        f"one task kind ({kind}) in all six languages: fusing programming languages within one task",
        {"kind": kind},
    )


def same_category(lang: str = "python") -> Scenario:
    if lang not in LANGUAGES:
        raise StudyError(f"unknown language '{lang}'; available: {', '.join(LANGUAGES)}")
    return Scenario(
        "same-category",
        tuple(f"{kind}-{lang}" for kind in CLASSIFICATION_KINDS),
        f"the classification tasks of one language ({lang}): fusing tasks of one category",
        {"lang": lang},
    )


def cross_category() -> Scenario:
    return Scenario(
        "cross-category",
        CROSS_CATEGORY,
        "retrieval and classification tasks spread over languages: fusing tasks of different categories",
    )


def pair() -> Scenario:
    return Scenario(
        "pair",
        PAIR,
        "two classification tasks of one language: the scenario of the two-model methods (PLeaS)",
    )


SCENARIOS = {
    "languages": languages,
    "same-category": same_category,
    "cross-category": cross_category,
    "pair": pair,
}


def from_yaml(path: str | Path) -> Scenario:
    """A scenario file: `name: ...`, `tasks: [defect-python, ...]`, optional `description`."""
    import yaml

    p = Path(path)
    try:
        data = yaml.safe_load(p.read_text())
    except OSError as exc:
        raise StudyError(f"cannot read scenario file {p}: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        raise StudyError(f"scenario file {p} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise StudyError(f"scenario file {p}: expected a mapping with 'tasks', got {type(data).__name__}")
    unknown = set(data) - {"name", "tasks", "description"}
    if unknown:
        raise StudyError(f"scenario file {p}: unknown key(s) {', '.join(sorted(unknown))}")
    tasks = data.get("tasks")
    if not isinstance(tasks, list) or not all(isinstance(t, str) for t in tasks):
        raise StudyError(f"scenario file {p}: 'tasks' must be a list of task names such as defect-python")
    return Scenario(str(data.get("name") or p.stem), tuple(tasks), str(data.get("description") or ""))


def resolve(name_or_path: str, *, kind: str = "search", lang: str = "python") -> Scenario:
    """A scenario by name, or from a YAML file; at least two distinct tasks."""
    if name_or_path in SCENARIOS:
        if name_or_path == "languages":
            sc = languages(kind)
        elif name_or_path == "same-category":
            sc = same_category(lang)
        else:
            sc = SCENARIOS[name_or_path]()
    elif name_or_path.endswith((".yaml", ".yml")) or Path(name_or_path).is_file():
        sc = from_yaml(name_or_path)
    else:
        raise StudyError(
            f"unknown scenario '{name_or_path}'; available: {', '.join(SCENARIOS)}, a YAML file listing tasks, "
            "or a generative one (gen-tasks, gen-languages, gen-cross)"
        )
    if len(set(sc.tasks)) != len(sc.tasks):
        raise StudyError(f"scenario '{sc.name}' lists a task twice: {', '.join(sc.tasks)}")
    if len(sc.tasks) < 2:
        raise StudyError(f"scenario '{sc.name}' needs at least two tasks to fuse, got {len(sc.tasks)}")
    return sc

"""A built-in task builds the same splits in two environments that differ in installed packages.

Environment B is a fresh virtual environment holding one extra package (`fakeerrors`, functions that
raise built-in exceptions, exactly what `exception-python` used to take from site-packages) and a .pth
file that makes sefusion and its dependencies importable. Both build `exception-python` and
`defect-python` from the standard library and print each task's counts and data fingerprint.
"""

from __future__ import annotations

import json
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import pytest

import sefusion

SCRIPT = textwrap.dedent(
    """
    import json, sys
    from sefusion.tasks.base import get_task
    out = {}
    for name in ("exception-python", "defect-python"):
        spec, lang = get_task(name)
        d = spec.build(lang, sizes={"train": 2400, "validation": 500, "test": 1000}, cache=sys.argv[1])
        out[name] = [d.fingerprint, {s: len(v) for s, v in d.splits.items()}]
    print(json.dumps(out))
    """
)

FAKE = """
def check_size(n):
    if n < 0:
        raise ValueError("negative size")
    return n


def check_kind(x):
    if not isinstance(x, int):
        raise TypeError("not an int")
    return x
"""


def _env_with_extra_package(root: Path) -> Path:
    """A venv whose site-packages holds `fakeerrors` (with its dist-info) and a .pth to this environment."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True)
    python = root / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())  # fmt: skip
    (site / "fakeerrors").mkdir(parents=True)
    (site / "fakeerrors" / "__init__.py").write_text(FAKE * 40)
    info = site / "fakeerrors-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: fakeerrors\nVersion: 1.0\nLicense: MIT\n")
    (info / "RECORD").write_text("fakeerrors/__init__.py,,\nfakeerrors-1.0.dist-info/METADATA,,\n")
    src = Path(sefusion.__file__).resolve().parent.parent
    (site / "here.pth").write_text(f"{src}\n{sysconfig.get_paths()['purelib']}\n")
    return python


@pytest.mark.slow
def test_same_splits_in_two_environments(tmp_path):
    python_b = _env_with_extra_package(tmp_path / "env-b")
    corpus_cache = tmp_path / "cache"  # shared: the standard library's extraction does not depend on it
    runs = []
    for python in (Path(sys.executable), python_b):
        res = subprocess.run([str(python), "-c", SCRIPT, str(corpus_cache)], capture_output=True, text=True)
        assert res.returncode == 0, res.stderr[-2000:]
        runs.append(json.loads(res.stdout.strip().splitlines()[-1]))
    check = subprocess.run([str(python_b), "-c", "import fakeerrors, sefusion; print(fakeerrors.__file__)"],
                           capture_output=True, text=True, check=True)  # fmt: skip
    assert "env-b" in check.stdout  # environment B really has the extra package
    assert runs[0] == runs[1]

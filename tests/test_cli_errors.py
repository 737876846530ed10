"""Every bad input through the CLI: a clear message naming the thing, exit code 2, no traceback,
no output folder and no temporary folder left behind."""

from __future__ import annotations

import errno
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import leftovers, read_folder, write_folder, write_recipe
from sefusion.cli import main


def run(argv: list[str], capsys) -> tuple[int, str]:
    code = main(argv)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err


def recipe_for(toy_env: dict, tmp_path: Path, method: str = "ties", **extra) -> Path:
    p = toy_env["paths"]
    models = [{"path": str(p[k]), "name": k} for k in p if k != "base"]
    body = {"method": method, "base": str(p["base"]), "models": models, **extra}
    return write_recipe(tmp_path / "recipe.yaml", **body)


def assert_nothing_written(out: Path, root: Path) -> None:
    assert not out.exists(), f"{out} was written"
    assert leftovers(root) == []


def test_good_merge_works(toy, tmp_path, capsys):
    env = toy()
    out = tmp_path / "out"
    code, err = run(["merge", str(recipe_for(env, tmp_path)), str(out), "-q"], capsys)
    assert code == 0, err
    assert set(read_folder(out)) == set(env["tensors"]["base"])
    assert (out / "config.json").is_file() and (out / "README.md").is_file()


def test_shape_mismatch_names_tensor_and_shapes(toy, tmp_path, capsys):
    env = toy()
    t = dict(env["tensors"]["e1"])
    t["layers.1.w"] = torch.zeros(8, 5)
    write_folder(env["paths"]["e1"], t)
    out = tmp_path / "out"
    code, err = run(["merge", str(recipe_for(env, tmp_path)), str(out)], capsys)
    assert code == 2
    assert "layers.1.w" in err and "(8, 5)" in err and "(5, 8)" in err and "e1" in err
    assert_nothing_written(out, tmp_path)


def test_missing_tensor_names_it(toy, tmp_path, capsys):
    env = toy()
    t = {k: v for k, v in env["tensors"]["e0"].items() if k != "layers.0.b"}
    write_folder(env["paths"]["e0"], t)
    out = tmp_path / "out"
    code, err = run(["merge", str(recipe_for(env, tmp_path)), str(out)], capsys)
    assert code == 2 and "layers.0.b" in err and "e0" in err
    assert_nothing_written(out, tmp_path)


def test_truncated_safetensors_names_file(toy, tmp_path, capsys):
    env = toy()
    f = env["paths"]["e2"] / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 40])
    out = tmp_path / "out"
    code, err = run(["merge", str(recipe_for(env, tmp_path)), str(out)], capsys)
    assert code == 2 and str(f) in err
    assert_nothing_written(out, tmp_path)


def test_corrupt_header_names_file(toy, tmp_path, capsys):
    env = toy()
    f = env["paths"]["e0"] / "model.safetensors"
    f.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all" + b"\x00" * 64)
    out = tmp_path / "out"
    code, err = run(["merge", str(recipe_for(env, tmp_path)), str(out)], capsys)
    assert code == 2 and str(f) in err
    assert_nothing_written(out, tmp_path)


def test_nonfinite_refused_then_allowed(toy, tmp_path, capsys):
    env = toy()
    t = dict(env["tensors"]["e1"])
    t["layers.0.w"] = t["layers.0.w"].clone()
    t["layers.0.w"][2, 3] = float("nan")
    write_folder(env["paths"]["e1"], t)
    out = tmp_path / "out"
    recipe = recipe_for(env, tmp_path, method="task_arithmetic")
    code, err = run(["merge", str(recipe), str(out)], capsys)
    assert code == 2 and "layers.0.w" in err and "--allow-nonfinite" in err
    assert_nothing_written(out, tmp_path)
    code, err = run(["merge", str(recipe), str(out), "--allow-nonfinite", "-q"], capsys)
    assert code == 0, err
    assert torch.isnan(read_folder(out)["layers.0.w"][2, 3])


def test_unknown_method_lists_available(toy, tmp_path, capsys):
    env = toy()
    out = tmp_path / "out"
    code, err = run(["merge", str(recipe_for(env, tmp_path, method="tiess")), str(out)], capsys)
    assert code == 2 and "tiess" in err and "ties" in err and "task_arithmetic" in err and "linear" in err
    assert_nothing_written(out, tmp_path)


@pytest.mark.parametrize(
    ("method", "params", "words"),
    [
        ("ties", {"density": 1.5}, ["density", "1.5"]),
        ("ties", {"density": 0}, ["density"]),
        ("dare_ties", {"density": -0.1}, ["density"]),
        ("cabs", {"n": 8, "m": 4}, ["n", "m"]),
        ("tall_masks", {"lambdas": {"e0": 0.3, "nosuch": 0.5}}, ["nosuch"]),
        ("ties", {"densty": 0.2}, ["densty", "density"]),
        ("ties", {"merge": "median"}, ["merge", "median"]),
    ],
)
def test_bad_params(toy, tmp_path, capsys, method, params, words):
    env = toy()
    out = tmp_path / "out"
    code, err = run(["merge", str(recipe_for(env, tmp_path, method=method, params=params)), str(out)], capsys)
    assert code == 2
    for w in words:
        assert w in err, (w, err)
    assert_nothing_written(out, tmp_path)


def test_per_model_bad_density(toy, tmp_path, capsys):
    env = toy()
    p = env["paths"]
    recipe = write_recipe(
        tmp_path / "r.yaml",
        method="ties",
        base=str(p["base"]),
        models=[{"path": str(p["e0"]), "params": {"density": 2.0}}, {"path": str(p["e1"])}],
    )
    code, err = run(["merge", str(recipe), str(tmp_path / "out")], capsys)
    assert code == 2 and "density" in err and "models[0]" in err


def test_missing_model_folder(toy, tmp_path, capsys):
    env = toy()
    p = env["paths"]
    recipe = write_recipe(
        tmp_path / "r.yaml",
        method="ties",
        base=str(p["base"]),
        models=[{"path": str(p["e0"])}, {"path": str(tmp_path / "no-such-expert")}],
    )
    out = tmp_path / "out"
    code, err = run(["merge", str(recipe), str(out)], capsys)
    assert code == 2 and "no-such-expert" in err
    assert_nothing_written(out, tmp_path)


def test_missing_recipe_file(tmp_path, capsys):
    code, err = run(["merge", str(tmp_path / "nope.yaml"), str(tmp_path / "out")], capsys)
    assert code == 2 and "nope.yaml" in err


def test_output_exists_needs_overwrite(toy, tmp_path, capsys):
    env = toy()
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    recipe = recipe_for(env, tmp_path)
    code, err = run(["merge", str(recipe), str(out)], capsys)
    assert code == 2 and "--overwrite" in err and str(out) in err
    assert (out / "keep.txt").read_text() == "mine"
    code, err = run(["merge", str(recipe), str(out), "--overwrite", "-q"], capsys)
    assert code == 0, err
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()
    assert leftovers(tmp_path) == []


def test_disk_full_leaves_nothing(toy, tmp_path, capsys, monkeypatch):
    env = toy()
    out = tmp_path / "out"

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    import sefusion.io.writer

    monkeypatch.setattr(sefusion.io.writer, "_pwrite_all", full)
    monkeypatch.setattr(sefusion.io.writer, "save_file", full)
    code, err = run(["merge", str(recipe_for(env, tmp_path)), str(out), "-q"], capsys)
    assert code == 2 and "disk full" in err.lower(), err
    assert_nothing_written(out, tmp_path)


def test_interrupt_leaves_nothing(toy, tmp_path, capsys):
    env = toy()
    out = tmp_path / "out"
    from sefusion.registry import METHODS

    spec = METHODS.get("task_arithmetic")
    calls = {"n": 0}
    real = spec.fn

    def interrupted(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    object.__setattr__(spec, "fn", interrupted)
    try:
        code, err = run(["merge", str(recipe_for(env, tmp_path, method="task_arithmetic")), str(out)], capsys)
    finally:
        object.__setattr__(spec, "fn", real)
    assert code == 130 and "interrupted" in err
    assert calls["n"] == 2
    assert_nothing_written(out, tmp_path)


def test_bad_recipe_subprocess_has_no_traceback(tmp_path):
    bad = write_recipe(tmp_path / "r.yaml", method="ties", models=[{"path": "x"}], bogus=1)
    proc = subprocess.run(
        [sys.executable, "-m", "sefusion", "merge", str(bad), str(tmp_path / "out")],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert "bogus" in proc.stderr and "Traceback" not in proc.stderr


def test_help_does_not_import_torch():
    code = (
        "import sys; from sefusion.cli import build_parser; build_parser().format_help(); "
        "from sefusion.registry import METHODS; "
        "print('torch' in sys.modules)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert proc.stdout.strip() == "False"


def test_methods_lists_every_method(capsys):
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    for name in [
        "linear",
        "task_arithmetic",
        "ties",
        "dare_linear",
        "dare_ties",
        "consensus",
        "cabs",
        "tall_masks",
        "scaling_masks",
    ]:
        assert f"{name}  [" in out
    assert "arxiv.org" in out and "density" in out


def test_extract_unknown_task_and_missing_bundle(toy, tmp_path, capsys):
    env = toy()
    bundle = tmp_path / "bundle"
    code, err = run(["merge", str(recipe_for(env, tmp_path, method="tall_masks")), str(bundle), "-q"], capsys)
    assert code == 0, err
    code, err = run(["extract", str(bundle), "nosuch", str(tmp_path / "t")], capsys)
    assert code == 2 and "nosuch" in err and "e0" in err
    code, err = run(["extract", str(tmp_path / "nobundle"), "e0", str(tmp_path / "t")], capsys)
    assert code == 2 and "nobundle" in err
    assert not (tmp_path / "t").exists()


def test_the_command_flushes_and_exits_with_mains_code():
    """`sefusion` (cli.run) skips the interpreter's teardown with os._exit: what it printed still arrives
    (pipes flushed) and the exit code is main()'s."""
    import subprocess
    import sys

    ok = subprocess.run([sys.executable, "-m", "sefusion", "methods"], capture_output=True, text=True)
    assert ok.returncode == 0 and "ties" in ok.stdout and ok.stdout.endswith("\n")
    bad = subprocess.run([sys.executable, "-m", "sefusion", "inspect", "/no/such/model"], capture_output=True,
                         text=True)  # fmt: skip
    assert bad.returncode == 2 and bad.stderr.startswith("sefusion: error:") and "Traceback" not in bad.stderr

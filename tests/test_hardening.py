"""Hostile inputs against merge, extract and inspect: each is exit code 2 (or the code the case names),
one `sefusion: error:` line with the words that name the thing, nothing written anywhere, and every
input byte-identical (sha256 of every file under the test folder, before and after)."""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from conftest import write_folder, write_recipe
from sefusion.cli import main
from sefusion.io._header import read_header


def snapshot(root: Path) -> dict[str, str]:
    """Every path under root: sha256 for files, the link target for links, 'dir' for folders."""
    out = {}
    for p in sorted(root.rglob("*")):
        key = str(p.relative_to(root))
        if p.is_symlink():
            out[key] = "-> " + os.readlink(p)
        elif p.is_dir():
            out[key] = "dir"
        else:
            out[key] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def recipe(env: dict, tmp: Path, method: str = "ties", file: str = "recipe.yaml", **extra) -> Path:
    p = env["paths"]
    models = [{"path": str(p[k]), "name": k} for k in p if k != "base"]
    body = {"method": method, "base": str(p["base"]), "models": models, **extra}
    return write_recipe(tmp / file, **body)


def merge_argv(env: dict, tmp: Path, out: Path | str = "out", *more: str, **extra) -> list[str]:
    return ["merge", str(recipe(env, tmp, **extra)), str(tmp / out), "-q", *more]


def make_bundle(env: dict, tmp: Path) -> Path:
    bundle = tmp / "bundle"
    assert main(["merge", str(recipe(env, tmp, "tall_masks", file="b.yaml")), str(bundle), "-q"]) == 0
    return bundle


def edit_manifest(bundle: Path, edit: Callable[[dict], None]) -> None:
    m = json.loads((bundle / "bundle.json").read_text())
    edit(m)
    (bundle / "bundle.json").write_text(json.dumps(m))


def extract_argv(bundle: Path, tmp: Path) -> list[str]:
    return ["extract", str(bundle), "e0", str(tmp / "t"), "-q"]


# -- the cases: setup(env, tmp) -> (argv, words the error line must hold) ------------------------------


def out_is_base(env, tmp):
    return merge_argv(env, tmp, "base", "--overwrite"), ["base", "is the input"]


def out_is_expert(env, tmp):
    return merge_argv(env, tmp, "e1", "--overwrite"), ["e1", "is the input"]


def out_holds_inputs(env, tmp):
    return ["merge", str(recipe(env, tmp)), str(tmp), "--overwrite"], ["holds the input"]


def out_is_recipe_folder(env, tmp):
    (tmp / "recipes").mkdir()
    r = recipe(env, tmp, file="recipes/r.yaml")
    return ["merge", str(r), str(tmp / "recipes"), "--overwrite"], ["recipes", "r.yaml"]


def out_inside_base(env, tmp):
    return merge_argv(env, tmp, "base/merged"), ["lies inside", "base"]


def out_links_to_expert(env, tmp):
    (tmp / "link").symlink_to(env["paths"]["e0"])
    return merge_argv(env, tmp, "link", "--overwrite"), ["link", "e0"]


def out_is_a_symlink(env, tmp):
    (tmp / "elsewhere").mkdir()
    (tmp / "link").symlink_to(tmp / "elsewhere")
    return merge_argv(env, tmp, "link", "--overwrite"), ["link", "symbolic link"]


def extract_over_its_bundle(env, tmp):
    bundle = make_bundle(env, tmp)
    return ["extract", str(bundle), "e0", str(bundle), "--overwrite"], ["bundle", "is the input"]


def corrupt_bundle_mask(env, tmp):
    bundle = make_bundle(env, tmp)
    f = bundle / "model.safetensors"
    info = read_header(f)["masks/layers.0.w"]
    data = bytearray(f.read_bytes())
    data[info.offset] ^= 0xFF
    f.write_bytes(bytes(data))
    return extract_argv(bundle, tmp), ["masks/layers.0.w", "checksum"]


def bundle_task_twice(env, tmp):
    bundle = make_bundle(env, tmp)
    edit_manifest(bundle, lambda m: m["tasks"].append(dict(m["tasks"][0])))
    return extract_argv(bundle, tmp), ["bundle.json", "e0", "twice"]


def bundle_without_tensors(env, tmp):
    bundle = make_bundle(env, tmp)
    edit_manifest(bundle, lambda m: m.pop("tensors"))
    return extract_argv(bundle, tmp), ["bundle.json", "tensors", "missing"]


def bundle_unknown_dtype(env, tmp):
    bundle = make_bundle(env, tmp)
    edit_manifest(bundle, lambda m: m["tensors"]["layers.0.w"].update(dtype="float7"))
    return extract_argv(bundle, tmp), ["bundle.json", "layers.0.w", "dtype"]


def bundle_wrong_shape(env, tmp):
    bundle = make_bundle(env, tmp)
    edit_manifest(bundle, lambda m: m["tensors"]["layers.0.w"].update(shape=[6, 8]))
    return extract_argv(bundle, tmp), ["vector/layers.0.w", "[6, 8]", "[8, 6]"]


def inspect_corrupt_bundle(env, tmp):
    bundle = make_bundle(env, tmp)
    f = bundle / "model.safetensors"
    info = read_header(f)["vector/layers.1.w"]
    data = bytearray(f.read_bytes())
    data[info.offset + 3] ^= 0x01
    f.write_bytes(bytes(data))
    return ["inspect", str(bundle)], ["vector/layers.1.w", "checksum"]


def lambda_nan(env, tmp):
    return merge_argv(env, tmp, method="task_arithmetic", params={"lambda": float("nan")}), [
        "lambda",
        "finite",
    ]


def lambda_inf(env, tmp):
    return merge_argv(env, tmp, method="task_arithmetic", params={"lambda": float("inf")}), [
        "lambda",
        "finite",
    ]


def weight_nan(env, tmp):
    argv = merge_argv(env, tmp)
    r = Path(argv[1])
    r.write_text(r.read_text().replace("name: e0", "name: e0\n  weight: .nan"))
    return argv, ["weight", "models[0]"]


def density_yes(env, tmp):
    argv = merge_argv(env, tmp, params={"density": True})
    r = Path(argv[1])
    r.write_text(r.read_text().replace("density: true", "density: yes"))
    return argv, ["density", "boolean"]


def fp16_overflow(env, tmp):
    big = {k: torch.full_like(v, 60000.0, dtype=torch.float16) for k, v in env["tensors"]["base"].items()}
    write_folder(env["paths"]["base"], big)
    for i in range(3):
        write_folder(env["paths"][f"e{i}"], {k: v + 4000 for k, v in big.items()})
    return merge_argv(env, tmp, method="task_arithmetic"), ["non-finite", "float16", "--allow-nonfinite"]


def int_tensor_in_expert(env, tmp):
    t = dict(env["tensors"]["e1"])
    t["layers.0.w"] = t["layers.0.w"].to(torch.int32)
    write_folder(env["paths"]["e1"], t)
    return merge_argv(env, tmp), ["layers.0.w", "int32", "e1", "integer"]


def config_not_json(env, tmp):
    (env["paths"]["base"] / "config.json").write_text("{model_type: toy")
    return merge_argv(env, tmp), ["config.json", "not valid JSON"]


def write_sharded(folder: Path, tensors: dict, weight_map: dict) -> None:
    for f in set(weight_map.values()) - {"../outside/evil.safetensors"}:
        save_file({k: tensors[k] for k in tensors if weight_map.get(k, f) == f}, str(folder / f))
    index = {"metadata": {}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))


def index_omits_a_tensor(env, tmp):
    base = env["paths"]["base"]
    (base / "model.safetensors").unlink()
    t = env["tensors"]["base"]
    names = sorted(t)
    wm = {n: "model-00001-of-00002.safetensors" if i < 2 else "model-00002-of-00002.safetensors"
          for i, n in enumerate(names)}  # fmt: skip
    write_sharded(base, t, wm)
    del wm[names[-1]]
    (base / "model.safetensors.index.json").write_text(json.dumps({"weight_map": wm}))
    return merge_argv(env, tmp), ["does not list", names[-1]]


def index_shard_outside(env, tmp):
    (tmp / "outside").mkdir()
    (tmp / "outside" / "evil.safetensors").write_bytes(b"\xff" * 64)
    base = env["paths"]["base"]
    (base / "model.safetensors").unlink()
    t = env["tensors"]["base"]
    wm = dict.fromkeys(t, "model-00001-of-00001.safetensors")
    wm["layers.0.b"] = "../outside/evil.safetensors"
    write_sharded(base, {k: v for k, v in t.items() if k != "layers.0.b"}, wm)
    return merge_argv(env, tmp), ["evil.safetensors", "outside the model folder"]


def linear_weights_sum_to_zero(env, tmp):
    argv = merge_argv(env, tmp, method="linear")
    r = Path(argv[1])
    text = (
        r.read_text()
        .replace("name: e0", "name: e0\n  weight: 1")
        .replace("name: e1", "name: e1\n  weight: -1")
    )
    r.write_text(text.replace("name: e2", "name: e2\n  weight: 0"))
    return argv, ["linear", "sum", "normalize"]


def shard_size_abc(env, tmp):
    return merge_argv(env, tmp, "out", "--shard-size", "abc"), ["--shard-size", "abc"]


def shard_size_zero(env, tmp):
    return merge_argv(env, tmp, "out", "--shard-size", "0"), ["--shard-size", "positive"]


def negative_header_dims(env, tmp):
    f = env["paths"]["e0"] / "model.safetensors"
    header = json.dumps({"w": {"dtype": "F32", "shape": [-2, 2], "data_offsets": [16, 0]}}).encode()
    f.write_bytes(struct.pack("<Q", len(header)) + header + b"\x00" * 16)
    return merge_argv(env, tmp), [str(f), "'w'"]


def yaml_alias_bomb(env, tmp):
    lines = ['a0: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    lines += [f"a{i}: &a{i} [" + ",".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 10)]
    r = tmp / "bomb.yaml"
    r.write_text("\n".join(lines) + "\nmethod: ties\nmodels: [{path: x}]\n")
    return ["merge", str(r), str(tmp / "out")], ["bomb.yaml", "alias"]


def yaml_python_tag(env, tmp):
    r = tmp / "tag.yaml"
    r.write_text('method: !!python/object/apply:os.system ["echo pwned"]\nmodels: [{path: x}]\n')
    return ["merge", str(r), str(tmp / "out")], ["tag.yaml", "line 1", "not plain data"]


def out_parent_is_a_file(env, tmp):
    (tmp / "afile").write_text("x")
    return merge_argv(env, tmp, "afile/out"), ["afile", "out", "not a folder"]


def inspect_negative_limit(env, tmp):
    return ["inspect", str(env["paths"]["base"]), "--limit", "-1"], ["--limit", "-1"]


CASES = [
    out_is_base, out_is_expert, out_holds_inputs, out_is_recipe_folder, out_inside_base, out_links_to_expert,
    out_is_a_symlink, extract_over_its_bundle, corrupt_bundle_mask, bundle_task_twice, bundle_without_tensors,
    bundle_unknown_dtype, bundle_wrong_shape, inspect_corrupt_bundle, lambda_nan, lambda_inf, weight_nan,
    density_yes, fp16_overflow, int_tensor_in_expert, config_not_json, index_omits_a_tensor,
    index_shard_outside, linear_weights_sum_to_zero, shard_size_abc, shard_size_zero, negative_header_dims,
    yaml_alias_bomb, yaml_python_tag, out_parent_is_a_file, inspect_negative_limit,
]  # fmt: skip


@pytest.mark.parametrize("case", CASES, ids=[c.__name__ for c in CASES])
def test_bad_input(case, toy, tmp_path, capsys):
    env = toy()
    argv, words = case(env, tmp_path)
    capsys.readouterr()
    before = snapshot(tmp_path)
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("sefusion: error:")]
    assert len(errors) == 1, err
    for w in words:
        assert w in errors[0], (w, errors[0])
    assert snapshot(tmp_path) == before  # nothing written or left behind, every input unchanged


# -- cases that are not exit code 2 -----------------------------------------------------------------


def test_fp16_overflow_written_when_allowed(toy, tmp_path, capsys):
    env = toy()
    argv, _ = fp16_overflow(env, tmp_path)
    assert main([*argv, "--allow-nonfinite"]) == 0, capsys.readouterr().err
    from conftest import read_folder

    assert torch.isinf(read_folder(tmp_path / "out")["layers.0.w"]).all()


def test_base_without_config_says_the_output_lacks_one(toy, tmp_path, capsys, caplog):
    env = toy()
    (env["paths"]["base"] / "config.json").unlink()
    code = main(merge_argv(env, tmp_path))
    assert code == 0, capsys.readouterr().err
    assert "no config.json" in caplog.text and "transformers cannot load" in caplog.text
    assert not (tmp_path / "out" / "config.json").exists()


def test_excluded_integer_tensor_is_copied_from_the_base_with_a_warning(toy, tmp_path, capsys, caplog):
    env = toy()
    t = dict(env["tensors"]["e1"])
    t["layers.0.b"] = torch.arange(8, dtype=torch.int32)
    write_folder(env["paths"]["e1"], t)
    code = main(merge_argv(env, tmp_path, exclude=["layers.0.b"]))
    assert code == 0, capsys.readouterr().err
    assert "layers.0.b" in caplog.text and "int32" in caplog.text and "copied" in caplog.text
    from conftest import read_folder

    assert torch.equal(read_folder(tmp_path / "out")["layers.0.b"], env["tensors"]["base"]["layers.0.b"])


def test_read_only_parent_names_out_and_the_reason(toy, tmp_path, capsys, monkeypatch):
    import errno

    import sefusion.io.publish as publish

    env = toy()
    argv = merge_argv(env, tmp_path)
    before = snapshot(tmp_path)

    def refused(path, mode=0o777):
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr(publish.os, "mkdir", refused)
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert str(tmp_path / "out") in err and "Permission denied" in err and ".tmp-" not in err
    assert snapshot(tmp_path) == before


def test_alias_bomb_is_refused_fast(toy, tmp_path, capsys):
    import time

    argv, _ = yaml_alias_bomb(toy(), tmp_path)
    t0 = time.perf_counter()
    assert main(argv) == 2
    assert time.perf_counter() - t0 < 2.0  # a hang guard: it used to run for 30 s and die of MemoryError
    assert "alias" in capsys.readouterr().err


def test_good_bundle_still_extracts_and_inspects(toy, tmp_path, capsys):
    env = toy()
    bundle = make_bundle(env, tmp_path)
    m = json.loads((bundle / "bundle.json").read_text())
    assert (
        m["format_version"] == 2
        and len(m["checksums"]) == 3 * 4
        and all(len(v) == 64 for v in m["checksums"].values())
    )
    assert main(extract_argv(bundle, tmp_path)) == 0
    assert main(["inspect", str(bundle)]) == 0
    assert "bundle" in capsys.readouterr().out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_count_nonfinite_matches_the_direct_count(dtype):
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from sefusion.io.util import count_nonfinite

    specials = st.sampled_from([float("nan"), float("inf"), -float("inf"), 3e38, -3e38, 6e4, 1e308, 0.0])
    values = st.lists(st.floats(-10, 10) | specials, max_size=300)

    @settings(max_examples=60, deadline=None)
    @given(values)
    def check(xs):
        t = torch.tensor(xs, dtype=torch.float64).to(dtype)  # overflow on the cast is part of the test
        assert count_nonfinite(t) == int((~torch.isfinite(t)).sum())

    check()
    assert count_nonfinite(torch.full((1000,), 3e38)) == 0  # the sum overflows, the entries do not
    assert count_nonfinite(torch.arange(5)) == 0


def test_shard_outside_the_folder_is_refused_before_it_is_opened(toy, tmp_path, capsys, monkeypatch):
    import builtins
    import io

    env = toy()
    argv, _ = index_shard_outside(env, tmp_path)
    opened: list[str] = []
    real_open, real_os_open = builtins.open, os.open

    def spy_open(file, *args, **kwargs):
        opened.append(str(file))
        return real_open(file, *args, **kwargs)

    def spy_os_open(path, *args, **kwargs):
        opened.append(str(path))
        return real_os_open(path, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", spy_open)
    monkeypatch.setattr(io, "open", spy_open)  # pathlib's read_text
    monkeypatch.setattr(os, "open", spy_os_open)
    assert main(argv) == 2
    assert "outside the model folder" in capsys.readouterr().err
    assert any(p.endswith("model.safetensors.index.json") for p in opened)  # the spies see the reads
    assert not [p for p in opened if p.startswith(str(tmp_path / "outside"))]

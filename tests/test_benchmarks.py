"""benchmarks/: the renderer's tables and targets on a hand-written result, and the checkpoint generator."""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCH))

import checkpoints  # noqa: E402
import compare  # noqa: E402
import render  # noqa: E402
import run  # noqa: E402

GB, MB = 10**9, 10**6


def _samples(*pairs: tuple[float, float], rc: int = 0) -> dict:
    return {"samples": [{"wall_s": t, "maxrss_bytes": int(m), "rc": rc} for t, m in pairs]}


def _group(size: str, params: int, largest: int, n: int, methods: dict) -> dict:
    return {
        "size": size,
        "experts": n,
        "params": params,
        "model_bytes": 2 * params,
        "inputs_bytes": 2 * params * (n + 1),
        "largest_tensor_bytes": largest,
        "shards": 3,
        "inputs_fit_in_ram": True,
        "repeats": 3,
        "floor": _samples((1.0, 40 * MB), (2.0, 40 * MB), (1.5, 40 * MB)),
        "methods": methods,
    }


def _result() -> dict:
    small = {
        # medians: sefusion 5 s / 900 MB, mergekit 64 s / 3.1 GB -> 12.8x, 0.29
        "ties": {
            "sefusion": _samples((5.0, 900 * MB), (4.0, 950 * MB), (6.0, 850 * MB)),
            "mergekit": _samples((64.0, 3.1 * GB), (70.0, 3.2 * GB), (60.0, 3.0 * GB)),
        },
        "linear": {"sefusion": _samples((2.0, 500 * MB)), "mergekit": _samples((10.0, 1 * GB))},  # 5x
        "task_arithmetic": {
            "sefusion": _samples((4.0, 500 * MB)),
            "mergekit": _samples((10.0, 1 * GB)),
        },  # 2.5x
        "tall_masks": {"sefusion": _samples((9.0, 1 * GB)), "mergekit": None},  # 1.8x ties
        "scaling_masks": {"sefusion": _samples((11.0, 1 * GB)), "mergekit": None},  # 2.2x ties
    }
    large = copy.deepcopy(small)
    # Allowance from 0.2b to 1b at 4 experts: (131 - 65.5) MB x 5 models = 327.5 MB.
    large["ties"]["sefusion"] = _samples((25.0, 1200 * MB))  # +300 MB: within
    large["linear"]["sefusion"] = _samples((10.0, 900 * MB))  # +400 MB: over
    # mergekit's memory grows with the model: 1.2 GB / 4.8 GB = 0.25 of it at 1b
    large["ties"]["mergekit"] = _samples((64.0, 4.8 * GB))
    return {
        "created": "2026-01-01 00:00 UTC",
        "command": ".venv/bin/python benchmarks/run.py",
        "quick": False,
        "machine": {
            "cpu_model": "Test CPU",
            "cpu_count": 2,
            "ram_bytes": 24 * GB,
            "os": "Linux",
            "python": "3.11",
        },
        "versions": {"sefusion": "0.1.0", "git_commit": "abc", "mergekit": "0.1.5"},
        "settings": {
            "sefusion_cmd": "sefusion merge RECIPE OUT",
            "mergekit_cmd": "mergekit-yaml CONFIG OUT",
            "floor_cmd": "io_floor.py",
            "env": {"HF_HUB_OFFLINE": "1"},
            "recipes": {"ties": {"sefusion": {"params": {"density": 0.2}}, "mergekit": None}},
        },
        "groups": [
            _group("1b", 1_100_000_000, 131 * MB, 4, large),
            _group("0.2b", 212_000_000, 65_500_000, 4, small),
        ],
    }


def test_summarize_takes_medians_of_successful_samples():
    s = render.summarize(_samples((1.0, 10), (3.0, 30), (2.0, 20))["samples"] + [{"wall_s": 0.1, "rc": 1}])
    assert s == {
        "n": 3,
        "failures": 1,
        "median_s": 2.0,
        "median_rss_bytes": 20,
        "median_cores": None,
        "median_sys_share": None,
    }
    cpu = [
        {"wall_s": 10.0, "maxrss_bytes": 1, "rc": 0, "user_s": 6.0, "sys_s": 4.0},  # 1 core, 40% sys
        {"wall_s": 10.0, "maxrss_bytes": 1, "rc": 0, "user_s": 18.0, "sys_s": 2.0},  # 2 cores, 10% sys
        {"wall_s": 10.0, "maxrss_bytes": 1, "rc": 0, "user_s": 14.0, "sys_s": 1.0},  # 1.5 cores
    ]
    s = render.summarize(cpu)
    assert s["median_cores"] == pytest.approx(1.5) and s["median_sys_share"] == pytest.approx(0.1)
    assert render.summarize([{"wall_s": 1.0, "rc": 2}])["median_s"] is None


def test_targets_pass_and_fail_from_the_numbers():
    by = {t["target"]: t for t in render.targets(_result())}
    ties_speed = by["ties ≥10x faster than mergekit"]
    assert ties_speed["status"] == "FAIL"  # 12.8x at 0.2b but 64/25 = 2.6x at 1b
    assert "ties 0.2b, 4 experts: 12.8x" in ties_speed["detail"]
    assert "ties 1b, 4 experts: 2.6x" in ties_speed["detail"]
    mem = by["ties peak memory ≤ 1/3 of mergekit's"]
    assert mem["status"] == "PASS"
    assert "ties 0.2b, 4 experts: 0.29 of mergekit's" in mem["detail"]
    assert "ties 1b, 4 experts: 0.25 of mergekit's" in mem["detail"]
    lin = by["linear and task_arithmetic ≥3x faster than mergekit"]
    assert lin["status"] == "FAIL"  # task_arithmetic at 2.5x
    assert "linear 0.2b, 4 experts: 5.0x" in lin["detail"]
    masks = by["tall_masks / scaling_masks ≤ 2x sefusion's ties time"]
    assert masks["status"] == "FAIL"  # scaling_masks 11 s vs ties 5 s
    assert "tall_masks 0.2b, 4 experts: 1.80x ties" in masks["detail"]
    scale = next(t for t in by.values() if t["target"].startswith("sefusion peak memory"))
    assert scale["status"] == "FAIL"
    assert "ties 4 experts: +300 MB (allowed +328 MB)" in scale["detail"]
    assert "linear 4 experts: +400 MB" in scale["detail"]


def test_memory_target_fails_when_one_size_is_over_a_third():
    data = _result()
    large = data["groups"][0]["methods"]
    large["ties"]["mergekit"] = _samples((64.0, 3.1 * GB))  # 1.2 / 3.1 = 0.39 at 1b
    mem = next(t for t in render.targets(data) if t["target"] == "ties peak memory ≤ 1/3 of mergekit's")
    assert mem["status"] == "FAIL"
    assert "ties 1b, 4 experts: 0.39 of mergekit's" in mem["detail"]


def test_targets_are_na_without_data():
    data = _result()
    data["groups"] = data["groups"][1:]  # one size: no scaling target
    for g in data["groups"]:
        g["methods"]["ties"]["mergekit"] = None
    by = {t["target"]: t["status"] for t in render.targets(data)}
    assert by["ties ≥10x faster than mergekit"] == "n/a"
    assert by["linear and task_arithmetic ≥3x faster than mergekit"] == "FAIL"
    assert next(s for t, s in by.items() if t.startswith("sefusion peak memory")) == "n/a"


def test_render_tables_are_deterministic_and_ordered_by_size():
    data = _result()
    text = render.render(data, "benchmarks/results/x.json")
    assert text == render.render(json.loads(json.dumps(data)), "benchmarks/results/x.json")
    assert text.index("## 0.2b (212M parameters), base + 4 experts") < text.index("## 1b (1100M parameters)")
    assert "| ties | 5.00 | 64.0 | 12.8x | 900 MB | 3.10 GB | 0.29 | – | – | 3x |" in text  # floor 1.5 s
    assert "| tall_masks | 9.00 | – | – | 1.00 GB | – | – | – | – | 6x |" in text
    assert "I/O floor: 1.50 s to read the 2.12 GB of inputs" in text
    assert "| ties ≥10x faster than mergekit | **FAIL** |" in text
    assert "benchmarks/render.py benchmarks/results/x.json" in text


def test_checkpoints_tiny_loads_in_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    from safetensors import safe_open

    base, e0, e1 = checkpoints.ensure("tiny", 7, 2, root=tmp_path, log=lambda *_: None)
    assert len(list(base.glob("model-*-of-*.safetensors"))) >= 2  # sharded, with an index
    index = json.loads((base / "model.safetensors.index.json").read_text())
    spec = checkpoints.SIZES["tiny"]
    assert sorted(index["weight_map"]) == sorted(n for n, _ in spec.tensors())

    model, info = transformers.LlamaForCausalLM.from_pretrained(e1, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert sum(p.numel() for p in model.parameters()) == spec.params

    name = "model.layers.1.mlp.down_proj.weight"
    with safe_open(base / index["weight_map"][name], "pt") as f:
        b = f.get_tensor(name)
    with safe_open(e1 / index["weight_map"][name], "pt") as f:
        e = f.get_tensor(name)
    assert str(b.dtype) == "torch.bfloat16"
    assert (model.state_dict()[name] == e).all()
    assert 0.015 < b.float().std() < 0.025
    assert 5e-4 < (e.float() - b.float()).std() < 2e-3

    # cached: a second call writes nothing; a third expert leaves the first two as they were
    mtime = (e1 / index["weight_map"][name]).stat().st_mtime_ns
    checkpoints.ensure("tiny", 7, 3, root=tmp_path, log=lambda *_: None)
    assert (e1 / index["weight_map"][name]).stat().st_mtime_ns == mtime
    with safe_open(tmp_path / "llama-tiny-s7" / "expert-2" / index["weight_map"][name], "pt") as f:
        assert not (f.get_tensor(name) == e).all()


# ---------------------------------------------------------------- output comparison


def _agreement(method: str, sef_steps: int, mk_steps: int, ab_steps: int, expect: str) -> dict:
    def stats(m: int) -> dict:
        return {
            "elements": 100,
            "max_steps": m,
            "worst_tensor": "w",
            "share_differ": 0.01 * (m > 0),
            "share_over_one_step": 0.01 * (m > 1),
            "within_one_step": m <= 1,
            "max_abs_diff": 1e-4 * m,
        }

    return {
        "expect": expect,
        "why": f"why {method}",
        "tensors": 3,
        "a_vs_b": {**stats(ab_steps), "rel_l2_vs_change": 0.001},
        "reference": {"a": stats(sef_steps), "b": stats(mk_steps)},
    }


def test_reference_target_judges_sefusion_against_float64():
    data = _result()
    small = data["groups"][1]["methods"]
    small["linear"]["agreement"] = _agreement("linear", 0, 0, 0, "equal")
    # mergekit many steps off (bf16 arithmetic) does not fail sefusion's target
    small["task_arithmetic"]["agreement"] = _agreement("task_arithmetic", 1, 300, 300, "exact")
    name = "sefusion outputs within one bf16 step of a float64 reference (linear, task_arithmetic)"
    t = next(t for t in render.targets(data) if t["target"] == name)
    assert t["status"] == "PASS", t
    assert (
        "task_arithmetic 0.2b, 4 experts: sefusion max 1 step(s) from float64 (mergekit max 300)"
        in t["detail"]
    )
    assert render.agreement_ok(small["task_arithmetic"]["agreement"]) is True
    assert render.agreement_ok(small["linear"]["agreement"]) is True

    small["task_arithmetic"]["agreement"] = _agreement("task_arithmetic", 2, 0, 2, "exact")
    t = next(t for t in render.targets(data) if t["target"] == name)
    assert t["status"] == "FAIL"
    assert render.agreement_ok(small["task_arithmetic"]["agreement"]) is False
    # "equal" also needs mergekit within one step of the reference and of sefusion
    assert render.agreement_ok(_agreement("linear", 0, 2, 2, "equal")) is False
    assert render.agreement_ok({**_agreement("ties", 9, 9, 9, "close"), "reference": None}) is None
    assert render.agreement_ok({"error": "compare.py failed"}) is False

    text = render.render(data, "x.json")
    assert "## Do the outputs agree?" in text
    assert "- task_arithmetic (exact: **NOT as expected**): max 2 bf16 steps apart" in text


def test_render_says_when_the_run_stopped_early():
    data = _result()
    text = render.render(data)
    assert "did not finish" in text  # the hand-written result has no total_s
    data["total_s"] = 100.0
    assert "did not finish" not in render.render(data)
    data["groups"][0]["methods"]["consensus"] = {"sefusion": {"samples": []}, "mergekit": None}
    del data["total_s"]
    text = render.render(data)
    assert "| consensus | not run | – |" in text
    assert "have no sample (consensus (1b, 4 experts))" in text
    data["plan"] = [{"size": "1b", "experts": 8, "repeats": {"sefusion": 1}, "methods": ["ties"]}]
    assert "have no sample (consensus (1b, 4 experts), ties (1b, 8 experts))" in render.render(data)


def test_supplementary_runs_show_tables_but_not_targets():
    data, sup = _result(), _result()
    sup["groups"] = sup["groups"][:1]
    sup["groups"][0]["experts"] = 8
    sup["groups"][0]["methods"] = {"ties": {"sefusion": _samples((600.0, 8 * GB)), "mergekit": None}}
    sup["command"] = ".venv/bin/python benchmarks/run.py --sizes 1b --experts 8"
    text = render.render(data, "main.json", [("sup.json", sup)])
    assert "## Supplementary run of 2026-01-01 00:00 UTC (`sup.json`)" in text
    assert "Made with `.venv/bin/python benchmarks/run.py --sizes 1b --experts 8`" in text
    assert "| ties | 600.0 | not run | – | 8.00 GB |" in text
    assert "benchmarks/render.py main.json --supplement sup.json" in text
    assert (
        text.split("## Targets")[1].split("## ")[0]
        == render.render(data, "main.json").split("## Targets")[1].split("## ")[0]
    )


def test_render_says_when_mergekit_was_not_run():
    data = _result()
    data["groups"][0]["methods"]["ties"]["mergekit"] = None  # 1b: mergekit skipped for time
    text = render.render(data)
    assert "| ties | 25.0 | not run | – |" in text
    assert "| tall_masks | 9.00 | – | – |" in text  # mergekit has no tall_masks at all


def test_bf16_steps_count_representable_values():
    torch = pytest.importorskip("torch")
    one = torch.tensor([1.0], dtype=torch.bfloat16)
    nxt = torch.nextafter(one, torch.tensor([2.0], dtype=torch.bfloat16))
    tiny = torch.tensor([2.0**-133], dtype=torch.bfloat16)  # smallest positive subnormal
    assert int(compare.steps(one, nxt)) == 1
    assert int(compare.steps(torch.tensor([0.0]), torch.tensor([-0.0]))) == 0
    assert int(compare.steps(tiny, -tiny)) == 2
    assert int(compare.steps(torch.tensor([1.0]), torch.tensor([2.0]))) == 128  # one binade
    # a float64 value is rounded once to bf16 before counting
    assert int(compare.steps(one, torch.tensor([1.0 + 2.0**-10], dtype=torch.float64))) == 0


def test_compare_against_float64_reference(tmp_path):
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file

    base, e0, e1 = checkpoints.ensure("tiny", 5, 2, root=tmp_path / "ck", log=lambda *_: None)
    a, b = compare.Folder(e0), compare.Folder(e1)
    ref = {n: compare.reference("linear", n, None, [a, b], 1.0) for n in a.names()}
    good = {n: r.to(torch.bfloat16) for n, r in ref.items()}
    bad = {n: t.clone() for n, t in good.items()}
    name = "model.layers.0.mlp.up_proj.weight"
    bits = bad[name].view(torch.int16)
    bits[0, 0] += 3 if bits[0, 0] >= 0 else -3  # three steps away from zero
    for folder, tensors in (("good", good), ("bad", bad)):
        (tmp_path / folder).mkdir()
        save_file(tensors, str(tmp_path / folder / "model.safetensors"))

    folders = [compare.Folder(p) for p in (base, e0, e1)]
    res = compare.compare(
        "linear",
        compare.Folder(tmp_path / "good"),
        compare.Folder(tmp_path / "bad"),
        folders[0],
        folders[1:],
        1.0,
    )
    assert res["reference"]["a"]["max_steps"] == 0
    assert res["reference"]["b"]["max_steps"] == 3 and res["reference"]["b"]["worst_tensor"] == name
    assert res["a_vs_b"]["max_steps"] == 3 and not res["a_vs_b"]["within_one_step"]
    assert res["a_vs_b"]["share_differ"] == pytest.approx(1 / sum(t.numel() for t in good.values()))
    # no reference for methods without a closed form
    res = compare.compare("ties", folders[1], folders[2], folders[0], folders[1:], 1.0)
    assert "reference" not in res and res["a_vs_b"]["max_steps"] > 1


# ---------------------------------------------------------------- harness pieces


def test_measure_records_peak_rss_and_kills_runaways(tmp_path):
    py = sys.executable
    s = run.measure([py, "-c", "b = b'x' * (300 * 10**6)"], tmp_path / "a.log", {}, timeout=60)
    assert s["rc"] == 0 and s["maxrss_bytes"] >= 300 * MB and "killed" not in s
    grow = "import time\nb = b'x' * (400 * 10**6)\ntime.sleep(30)"
    s = run.measure([py, "-c", grow], tmp_path / "b.log", {}, timeout=60, max_rss=200 * MB)
    assert s["rc"] != 0 and s["killed"].startswith("killed at") and s["wall_s"] < 20
    s = run.measure([py, "-c", "import time; time.sleep(30)"], tmp_path / "c.log", {}, timeout=0.5)
    assert s["timed_out"] and s["rc"] != 0 and s["wall_s"] < 20


def test_recipes_and_configs_say_the_same_merge(tmp_path):
    yaml = pytest.importorskip("yaml")
    base, experts = tmp_path / "base", [tmp_path / "e0", tmp_path / "e1"]
    sef = yaml.safe_load(run._yaml(run.sefusion_recipe("ties", base, experts, 0)))
    assert sef == {
        "method": "ties",
        "base": str(base),
        "models": [{"path": str(e), "name": e.name, "weight": 1.0} for e in experts],
        "params": {"density": 0.2, "lambda": 1.0},
        "dtype": "bfloat16",
        "seed": 0,
    }
    mk = yaml.safe_load(run._yaml(run.mergekit_config("ties", base, experts)))
    assert mk["merge_method"] == "ties" and mk["base_model"] == str(base) and mk["dtype"] == "bfloat16"
    assert mk["parameters"] == {"normalize": True}  # our merge: mean
    assert [m["parameters"] for m in mk["models"]] == [{"density": 0.2, "weight": 1.0}] * 2
    assert "base_model" not in yaml.safe_load(run._yaml(run.mergekit_config("linear", base, experts)))
    assert run.mergekit_config("tall_masks", base, experts) is None


def test_default_plan_and_overrides():
    plan = run.make_plan(run.parse_args([]))
    by = {(g.size, g.experts): g for g in plan}
    assert [(g.size, g.experts) for g in plan] == [("0.2b", 4), ("0.2b", 8), ("1b", 4), ("1b", 8)]
    assert by[("0.2b", 4)].reps == {"sefusion": 3, "mergekit": 2}
    assert by[("1b", 8)].reps["mergekit"] == 0 and "ties" in by[("1b", 8)].methods
    assert by[("1b", 4)].methods == list(render.METHODS)
    plan = run.make_plan(
        run.parse_args(["--sizes", "1b", "--experts", "8", "--repeats", "2", "--methods", "ties"])
    )
    assert [(g.reps, g.methods) for g in plan] == [({"sefusion": 2, "mergekit": 2}, ["ties"])]
    quick = run.make_plan(run.parse_args(["--quick"]))
    assert [(g.size, g.experts, g.reps["sefusion"]) for g in quick] == [("0.05b", 2, 1)]


@pytest.mark.slow
def test_quick_run_end_to_end(tmp_path):
    """The whole harness on the --quick plan: both tools (mergekit's venv is installed if missing), the
    output comparison and the rendered markdown. Minutes: slow tier only."""
    out, md = tmp_path / "quick.json", tmp_path / "quick.md"
    args = [
        "--quick",
        "--methods",
        "linear,task_arithmetic,tall_masks",
        "--output",
        str(out),
        "--markdown",
        str(md),
    ]
    assert run.main(args) == 0
    data = json.loads(out.read_text())
    (g,) = data["groups"]
    assert g["size"] == "0.05b" and g["experts"] == 2
    for m in ("linear", "task_arithmetic"):
        e = g["methods"][m]
        assert [s["rc"] for s in e["sefusion"]["samples"] + e["mergekit"]["samples"]] == [0, 0]
        assert render.agreement_ok(e["agreement"]) is True, e["agreement"]
    assert g["methods"]["linear"]["agreement"]["a_vs_b"]["max_steps"] <= 1
    assert g["methods"]["tall_masks"]["mergekit"] is None
    text = md.read_text()
    assert "**Quick smoke run**" in text and "## Do the outputs agree?" in text

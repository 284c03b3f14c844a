"""scripts/bench_train.py: the table and the JSON a GPU run is read from, on a tiny CPU run."""

import importlib.util
import json
import subprocess
import sys

import pytest

from nanochat.common import REPO_ROOT

SCRIPT = REPO_ROOT / "scripts" / "bench_train.py"
TINY = ["--device", "cpu", "--depth", "1", "--seq_len", "16", "--batch_size", "2", "--steps", "2",
        "--warmup", "1", "--no-compile"]


def load_script():
    spec = importlib.util.spec_from_file_location("bench_train_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run(args, tmp_path):
    out = tmp_path / "bench.json"
    result = subprocess.run([sys.executable, str(SCRIPT), *TINY, *args, "--json", str(out)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result.stdout, json.loads(out.read_text())


@pytest.mark.slow  # two worker processes: ~15 s, more on a busy machine
def test_table_last_and_json_fields(tmp_path):
    stdout, data = run(["--variants", "baseline,mhc_ref", "--jobs", "2"], tmp_path)
    table = stdout.strip().splitlines()[-4:]
    assert table[0].startswith("| variant | ms/step | tokens/s | MFU | vs baseline | peak GiB")
    assert table[2].startswith("| baseline |") and table[3].startswith("| mhc_ref |")
    rows = {r["variant"]: r for r in data["rows"]}
    assert list(rows) == ["baseline", "mhc_ref"]
    for r in rows.values():
        assert r["status"] == "ok"
        assert r["ms_per_step"] > 0 and r["tokens_per_s"] == pytest.approx(32 / (r["ms_per_step"] / 1e3))
        assert r["mfu"] == pytest.approx(r["tokens_per_s"] * data["meta"]["baseline_flops_per_token"]
                                         / data["meta"]["peak_flops"])
        assert r["peak_gib"] is None and r["compile_s"] is None  # CPU, not compiled
        assert r["params"] > 0 and r["loss"] > 0
    assert rows["baseline"]["vs_baseline"] == 1.0
    assert rows["mhc_ref"]["params"] > rows["baseline"]["params"]  # the mHC model really ran
    meta = data["meta"]
    assert (meta["depth"], meta["batch_size"], meta["seq_len"], meta["tokens_per_step"]) == (1, 2, 16, 32)
    for key in ("command", "device", "torch", "commit", "date"):
        assert meta[key]


def test_a_variant_over_its_limit_costs_only_its_row(tmp_path):
    stdout, data = run(["--variants", "mhc_ref", "--timeout_s", "0.5"], tmp_path)
    [row] = data["rows"]
    assert row["status"].startswith("timeout after")
    assert "| mhc_ref | - |" in stdout.strip().splitlines()[-1]


def test_missing_library_skips_the_row(monkeypatch):
    bench = load_script()
    monkeypatch.setitem(sys.modules, "hyper_connections", None)  # import raises ImportError
    monkeypatch.setitem(sys.modules, "transformers", None)
    args = bench.build_parser().parse_args(TINY)
    for name in ("hc_mhc", "hf_gpt2"):
        with pytest.raises(bench.Skip, match="not importable"):
            bench.build_variant(name, args, "cpu")


def test_bad_arguments_fail_before_any_work():
    bench = load_script()
    with pytest.raises(ValueError, match="unknown"):
        bench.main([*TINY, "--variants", "baseline,nope"])
    with pytest.raises(ValueError, match="--steps 0"):
        bench.main([*TINY, "--steps", "0"])


def test_count_saved_shows_the_recompute(tmp_path):
    """--count_saved (fake tensors, no compute): the fused stack keeps less for backward than the
    per-sublayer kernels, which keep less than the reference; all keep more than the baseline."""
    bench = load_script()
    rows = bench.main(["--count_saved", "--depth", "2", "--seq_len", "64", "--batch_size", "2",
                       "--variants", "baseline,mhc_ref,mhc_fused_sublayer,mhc_fused",
                       "--json", str(tmp_path / "saved.json")])
    gib = {r["variant"]: r["saved_gib"] for r in rows}
    assert gib["baseline"] < gib["mhc_fused"] < gib["mhc_fused_sublayer"] < gib["mhc_ref"]
    assert json.loads((tmp_path / "saved.json").read_text())["rows"][0]["vs_baseline"] == 1.0


def test_profile_lists_the_top_ops_before_the_table(tmp_path):
    stdout, data = run(["--variants", "baseline", "--profile", "1"], tmp_path)
    profile = data["rows"][0]["profile"]
    assert 0 < len(profile) <= 12 and all(k["ms_per_step"] > 0 and 0 < k["share"] <= 1 for k in profile)
    assert [k["ms_per_step"] for k in profile] == sorted((k["ms_per_step"] for k in profile), reverse=True)
    assert "baseline: where a step's time goes" in stdout
    assert stdout.strip().splitlines()[-1].startswith("| baseline |")  # the table is still last

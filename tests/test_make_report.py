"""scripts/make_report.py on a synthetic ledger: the right means and sds, figures made, "no data"
where an arm or metric is missing, the discussion kept, ingest rules."""

import importlib.util
import io
import json
import tarfile

import numpy as np
import pytest

from nanochat.common import REPO_ROOT


def load_script(name):
    """scripts/ is not a package: load the script as a module (it runs nothing on import)."""
    spec = importlib.util.spec_from_file_location(f"{name}_script", REPO_ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


mr = load_script("make_report")


def metric(value, stderr=None, n=None):
    return {"value": value, "stderr": stderr, "n": n, "source": "synthetic"}


def make_entry(arm_id, group, seed, metrics, depth=4, rl=None):
    entry = {f: None for f in mr.REQUIRED_FIELDS}
    entry.update(schema=1, arm_id=arm_id, group=group, variant="mhc" if group.startswith("mhc") else "baseline",
                 depth=depth, seed=seed, lr_scale=1.0, lr_sweep=[], data={"corpus": "enwiki"},
                 target_tokens=4096, tokens_trained=4096, passes=0.5, total_batch_size=1024, device_batch_size=2,
                 max_seq_len=512, command="python3 scripts/run_arm.py start --queue q.json",
                 arm_args=["--seed", str(seed)],
                 stage_commands={}, commit="abc1234", device="NVIDIA H200", torch="2.11", python="3.12",
                 date="2026-11-23T00:00:00+00:00", finished="2026-11-23T00:10:00+00:00", wall_s=600.0,
                 status="complete", stages={}, metrics=metrics, rl=rl or {}, rl_baked=None, artifacts=[], notes=[])
    return entry


def write_metrics_jsonl(folder, mhc: bool):
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for step in range(1, 5):
        lines.append({"step": step, "loss": 5.0 - step * 0.5, "step_s": 0.5, "tokens": step * 1024})
        if step % 2 == 0:
            rec = {"step": step, "val_bpb": 3.0 - step * 0.1}
            if mhc:
                rec["mhc_stream_sim"] = [0.9, 0.8, 0.7, 0.6]
            lines.append(rec)
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))


def rl_report():
    acc = {"accuracy": 0.1, "correct": 4, "ci_low": 0.04, "ci_high": 0.23}
    dense = {"mean": -1.5, "stderr": 0.02, "ci_low": -1.54, "ci_high": -1.46}
    policy = {"n": 40, "strict": acc, "flexible": acc, "dense": dense, "reward": dense,
              "gate_mean": [0.2, 0.4, 0.6, 0.8], "gate_std": [0.05] * 4}
    comparison = {"a": "rl", "b": "learned_default", "n": 40,
                  "strict": {"a_only": 2, "b_only": 1, "difference": 0.025, "p_value": 1.0},
                  "flexible": {"a_only": 2, "b_only": 1, "difference": 0.025, "p_value": 1.0},
                  "dense": {"difference": 0.01, "ci_low": -0.01, "ci_high": 0.03, "p_value": 0.4}}
    return {"per_layer-logprob": {"gate_mode": "per_layer", "reward": "logprob", "n_eval": 40,
                                  "best_constant_gate": 0.5, "learned_default_gates": [0.5] * 8,
                                  "slot_labels": ["L0", "L1", "L2", "L3"],
                                  "policies": {"rl": policy, "learned_default": {**policy, "gate_mean": None}},
                                  "comparisons": [comparison]}}


def build_ledger(runs):
    """3 baseline seeds, 2 mHC seeds (one with artifacts: curves, H_res, RL), nothing for SFT / RL columns."""
    entries = [make_entry(f"b{s}", "baseline", s,
                          {"eval.bpb.bpb": metric(v), "train.tokens_per_s": metric(2000.0),
                           "eval.hellaswag_0shot.acc_norm": metric(0.25 + s / 100, 0.004, 10042)})
               for s, v in enumerate([1.50, 1.52, 1.54])]
    entries += [make_entry(f"m{s}", "mhc", s, {"eval.bpb.bpb": metric(v), "train.steady_seconds": metric(4.0)},
                           rl=rl_report() if s == 0 else None) for s, v in enumerate([1.48, 1.50])]
    for e in entries:
        path = runs / "ledger" / f"{e['arm_id']}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(e))
    write_metrics_jsonl(runs / "artifacts" / "b0" / "train", mhc=False)
    art = runs / "artifacts" / "m0"
    write_metrics_jsonl(art / "train", mhc=True)
    (art / "hres").mkdir(parents=True)
    eye = np.tile(np.eye(4), (8, 1, 1))
    np.savez_compressed(art / "hres" / "hres.npz", hres_mean=eye, hres_tokens=np.stack([eye, eye]),
                        slot_labels=np.array([f"L{i // 2} {'attn' if i % 2 == 0 else 'mlp'}" for i in range(8)]),
                        token_positions=np.array([1, 16]), token_text=np.array(["a", "b"]))
    episodes = [{"policy": "rl", "problem_id": i, "gates": [0.1 * (i % 10)] * 4, "correct_strict": i % 3 == 0,
                 "correct_flexible": i % 3 == 0, "logprob": -1.0 - i / 100} for i in range(40)]
    (art / "rl" / "per_layer-logprob").mkdir(parents=True)
    (art / "rl" / "per_layer-logprob" / "episodes.jsonl").write_text("".join(json.dumps(e) + "\n" for e in episodes))
    return runs


def run_report(runs, tmp_path):
    out_md = tmp_path / "docs" / "results.md"
    mr.main(["--runs_dir", str(runs), "--out_md", str(out_md), "--fig_dir", str(tmp_path / "docs" / "figures")])
    return out_md.read_text()


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """The report of the synthetic ledger, made once (figures take seconds): (text, its folder)."""
    tmp = tmp_path_factory.mktemp("report")
    return run_report(build_ledger(tmp / "runs"), tmp), tmp


def prd_row(text, label):
    table = text.split("## PRD 4.1 table: d4")[1].split("\n\n")[1]
    return next(line for line in table.splitlines() if line.startswith(f"| {label} |")).split(" | ")


def test_prd_table_means_sds_and_no_data(report):
    text = report[0]
    row = prd_row(text, "val bpb")
    assert row[1] == "1.5200 ± 0.0200 (n=3)"  # baseline: mean and sample sd of 1.50, 1.52, 1.54
    assert row[2] == "1.4900 ± 0.0141 (n=2)"  # mHC: 1.48, 1.50
    assert row[3] == mr.NO_DATA and row[4].startswith(mr.NO_DATA)  # no SFT / RL-tuned evals in the ledger
    hellaswag = prd_row(text, "HellaSwag 0-shot, acc_norm")
    assert hellaswag[1] == "0.260 ± 0.010 (n=3)" and hellaswag[2] == mr.NO_DATA
    # provenance: each column names its arms, every arm is in the provenance table
    assert "- baseline: b0, b1, b2" in text and "- dynamic mHC: m0, m1" in text
    for arm in ("b0", "b1", "b2", "m0", "m1"):
        assert f"| {arm} | " in text.split("## Provenance")[1]


def test_difference_uses_welch_interval(report):
    text = report[0]
    row = next(line for line in text.splitlines() if line.startswith("| d4, 4,096 | val bpb |"))
    # mHC - baseline = -0.03; se = sqrt(0.0002/2 + 0.0004/3); Welch df 2.88 -> 2 -> t 4.303
    assert "-0.0300 [-0.0957, +0.0357]" in row and "no difference measurable" in row


def test_figures_exist_and_are_linked(report):
    text, tmp = report
    figs = tmp / "docs" / "figures"
    for name in ("loss_d4.png", "equal_d4.png", "hres_mean_m0.png", "hres_tokens_m0.png", "stream_sim_m0.png",
                 "rl_gates_m0.png", "gate_vs_acc_m0_per_layer-logprob.png"):
        assert (figs / name).stat().st_size > 1000, name
        assert f"(figures/{name})" in text
    assert f"- learning-rate sweeps: {mr.NO_DATA}" in text  # no arm swept


def test_empty_ledger_says_no_data(tmp_path):
    text = run_report(tmp_path / "runs", tmp_path)
    assert "no baseline or mHC arm" in text and text.count(mr.NO_DATA) >= 5
    assert not list((tmp_path / "docs").rglob("*.png"))  # no figure without data


def test_discussion_block_is_kept(tmp_path):
    run_report(tmp_path / "runs", tmp_path)
    out_md = tmp_path / "docs" / "results.md"
    out_md.write_text(out_md.read_text().replace("written by hand", "mHC helps by 0.03 bpb (hand-written)"))
    assert "mHC helps by 0.03 bpb (hand-written)" in run_report(tmp_path / "runs", tmp_path)


def test_entry_without_a_field_is_refused(tmp_path):
    ledger = build_ledger(tmp_path / "runs")
    path = ledger / "ledger" / "b0.json"
    entry = json.loads(path.read_text())
    del entry["commit"]
    path.write_text(json.dumps(entry))
    with pytest.raises(SystemExit, match="b0.json.*commit"):
        run_report(ledger, tmp_path)


def pack_with(tmp_path, entry, name="pack.tar.gz"):
    path = tmp_path / name
    with tarfile.open(path, "w:gz") as tar:
        data = json.dumps(entry).encode()
        info = tarfile.TarInfo(f"{entry['arm_id']}/ledger_entry.json")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return path


def test_ingest_updates_a_snapshot_and_refuses_another_run(tmp_path):
    runs = tmp_path / "runs"
    first = make_entry("x0", "mhc", 0, {"eval.bpb.bpb": metric(1.6)})
    first.update(status="partial", finished="2026-11-23T00:05:00+00:00")
    assert mr.ingest(pack_with(tmp_path, first), runs) == ["x0"]
    later = make_entry("x0", "mhc", 0, {"eval.bpb.bpb": metric(1.6)})  # the same run, a later poll
    assert mr.ingest(pack_with(tmp_path, later, "later.tar.gz"), runs) == ["x0"]
    assert json.loads((runs / "ledger" / "x0.json").read_text())["status"] == "complete"
    assert mr.ingest(pack_with(tmp_path, first, "old.tar.gz"), runs) == []  # an older snapshot changes nothing
    other = make_entry("x0", "mhc", 0, {})
    other["date"] = "2026-11-24T00:00:00+00:00"
    with pytest.raises(ValueError, match="another run"):
        mr.ingest(pack_with(tmp_path, other, "other.tar.gz"), runs)


def test_a_repeated_seed_counts_once(tmp_path):
    """Seed 0 trained twice (e.g. again to extend a sweep) is one sample: the mean of its runs; the two
    runs appear in the repeats table with their difference."""
    import statistics
    runs = tmp_path / "runs"
    entries = [make_entry("b0", "baseline", 0, {"eval.bpb.bpb": metric(1.50)}),
               make_entry("b0again", "baseline", 0, {"eval.bpb.bpb": metric(1.51)}),
               make_entry("b1", "baseline", 1, {"eval.bpb.bpb": metric(1.52)}),
               make_entry("b2", "baseline", 2, {"eval.bpb.bpb": metric(1.54)}),
               make_entry("m0", "mhc", 0, {"eval.bpb.bpb": metric(1.48)}),
               make_entry("m1", "mhc", 1, {"eval.bpb.bpb": metric(1.49)})]
    for e in entries:
        (runs / "ledger").mkdir(parents=True, exist_ok=True)
        (runs / "ledger" / f"{e['arm_id']}.json").write_text(json.dumps(e))
    text = run_report(runs, tmp_path)
    per_seed = [1.505, 1.52, 1.54]
    row = prd_row(text, "val bpb")
    assert row[1] == f"{statistics.mean(per_seed):.4f} ± {statistics.stdev(per_seed):.4f} (n=3, seed 0 run twice)"
    assert row[2] == "1.4850 ± 0.0071 (n=2)"
    diff = next(line for line in text.splitlines() if line.startswith("| d4, 4,096 | val bpb |"))
    assert "| 2, 3 |" in diff
    repeats = text.split("## Repeated runs of one seed")[1].split("\n\n")[1]
    assert "| d4 | baseline | 0 | 1.000 | b0, b0again | 1.50000, 1.51000 | 0.01000 |" in repeats
    assert "mhc" not in repeats


def test_equal_time_table_compares_mhc_with_the_equal_time_baselines(tmp_path):
    """The equal-wall-clock answer: mHC arms against `baseline_equal_time` arms of the same depth and
    device (more tokens), with a Welch interval; an equal-time arm on another device is left out."""
    runs = tmp_path / "runs"
    entries = [make_entry(f"b{s}", "baseline", s, {"eval.bpb.bpb": metric(1.52), "train.tokens_per_s": metric(2000.0)})
               for s in range(2)]
    entries += [make_entry(f"m{s}", "mhc", s, {"eval.bpb.bpb": metric(v), "train.steady_seconds": metric(4.0)})
                for s, v in enumerate([1.48, 1.50])]
    entries += [make_entry(f"e{s}", "baseline_equal_time", s, {"eval.bpb.bpb": metric(v), "train.steady_seconds": metric(4.1)})
                for s, v in enumerate([1.44, 1.45, 1.46])]
    other = make_entry("e9", "baseline_equal_time", 9, {"eval.bpb.bpb": metric(9.0)})
    other["device"] = "another GPU"
    for e in entries + [other]:
        if e["group"] == "baseline_equal_time":
            e["target_tokens"] = 8192
        (runs / "ledger").mkdir(parents=True, exist_ok=True)
        (runs / "ledger" / f"{e['arm_id']}.json").write_text(json.dumps(e))
    text = run_report(runs, tmp_path)
    section = text.split("## Equal wall-clock time")[1].split("\n## ")[0]
    row = next(line for line in section.splitlines() if line.startswith("| d4 | NVIDIA H200 |"))
    # mHC 1.49 (sd 0.0141, n 2) - baseline 1.45 (sd 0.01, n 3) = +0.04; se = sqrt(0.0002/2 + 0.0001/3);
    # Welch df 1.7 -> 1 -> t 12.706: [+0.04 - 12.706 * 0.011547, ...]
    assert "| 4,096 | 4.0 ± 0.0 (n=2) | 8,192 | 4.1 ± 0.0 (n=3) | +0.0400 [-0.1067, +0.1867] | 2, 3 | no difference measurable |" in row
    assert "another GPU" not in section

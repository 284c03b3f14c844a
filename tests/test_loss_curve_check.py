"""scripts/loss_curve_check.py: the comparison logic on synthetic curves, and one tiny CPU run."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
import loss_curve_check  # noqa: E402


def write_curve(run_dir: Path, losses, bpbs):
    lines = [json.dumps({"step": s, "loss": v}) for s, v in enumerate(losses, start=1)]
    lines += [json.dumps({"step": s, "val_bpb": v}) for s, v in bpbs.items()]
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    return run_dir


def test_compare_passes_within_seed_noise_and_fails_beyond_it(tmp_path):
    ref = write_curve(tmp_path / "ref", [5.0, 4.0, 3.0, 2.9, 2.8, 2.7], {3: 2.0, 6: 1.8})
    close = write_curve(tmp_path / "close", [5.0, 4.0, 3.01, 2.91, 2.8, 2.7], {3: 2.001, 6: 1.801})
    seed = write_curve(tmp_path / "seed", [5.2, 4.1, 3.05, 2.95, 2.83, 2.72], {3: 2.02, 6: 1.81})
    far = write_curve(tmp_path / "far", [5.0, 4.0, 3.2, 3.1, 3.0, 2.9], {3: 2.1, 6: 1.9})
    good = loss_curve_check.compare(ref, close, seed, window=2)
    assert good["verdict"] == "PASS"
    assert good["loss_fused_vs_ref"] == pytest.approx(0.01) and good["loss_seed_vs_ref"] == pytest.approx(0.05)
    bad = loss_curve_check.compare(ref, far, seed, window=2)
    assert bad["verdict"] == "FAIL" and bad["loss_fused_vs_ref"] == pytest.approx(0.2)
    # the loss agrees but val bpb does not: still a failure
    bpb_only = write_curve(tmp_path / "bpb", [5.0, 4.0, 3.0, 2.9, 2.8, 2.7], {3: 2.5, 6: 1.8})
    assert loss_curve_check.compare(ref, bpb_only, seed, window=2)["verdict"] == "FAIL"


def test_too_few_steps_for_the_window_is_a_clear_error(capsys):
    with pytest.raises(SystemExit, match="at least 2 x --window"):
        loss_curve_check.main(["--steps", "10", "--window", "25"])


@pytest.mark.parametrize("jobs", ["1", "3"])
def test_tiny_cpu_run_writes_report(tmp_path, jobs):
    result = loss_curve_check.main(["--jobs", jobs,
        "--device", "cpu", "--depth", "1", "--steps", "4", "--window", "2", "--data", "tinyshakespeare",
        "--max_seq_len", "32", "--device_batch_size", "2", "--total_batch_size", "64", "--eval_every", "2",
        "--eval_tokens", "128", "--out_dir", str(tmp_path)])
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["verdict"] == result["verdict"] == "PASS"  # on CPU the fused path is the reference
    assert saved["loss_fused_vs_ref"] < 1e-4 < saved["loss_seed_vs_ref"]  # float noise only
    assert [e["step"] for e in saved["evals"]] == [2, 4]


@pytest.mark.parametrize("jobs", ["1", "3"])
def test_a_failed_run_shows_the_end_of_its_log(tmp_path, jobs):
    with pytest.raises(SystemExit, match=r"(?s)the reference run failed.*missing"):
        loss_curve_check.main(["--jobs", jobs, "--device", "cpu", "--depth", "1", "--steps", "4", "--window", "2",
                               "--data", "tinyshakespeare", "--data_dir", str(tmp_path / "missing"),
                               "--out_dir", str(tmp_path / "out")])


def test_fused_args_reach_the_fused_run_only(tmp_path, monkeypatch):
    """--fused_args (e.g. bf16 streams) is added to the fused run's command, never to the two reference runs."""
    commands = {}

    class FakePopen:
        def __init__(self, cmd, **kwargs):
            commands[Path(cmd[cmd.index("--out_dir") + 1]).name] = cmd
    monkeypatch.setattr(loss_curve_check.subprocess, "Popen", FakePopen)
    args = loss_curve_check.build_parser().parse_args(["--out_dir", str(tmp_path), "--fused_args",
                                                       "--mhc_stream_dtype bfloat16"])
    for name, fused in (("reference", False), ("fused", True)):
        loss_curve_check.start_training(args, name, 42, fused)
    fused_cmd = commands["fused"]
    assert fused_cmd[fused_cmd.index("--mhc_stream_dtype") + 1] == "bfloat16"
    assert "--mhc_stream_dtype" not in commands["reference"]

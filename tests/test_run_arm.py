"""scripts/run_arm.py: arm flags and queues checked before any work, stage limits that stop a whole
process group, the pack under the device's size limit, and (slow) a CPU dry run of every stage that
ends in a packed tarball and complete ledger entries."""

import importlib.util
import json
import lzma
import os
import subprocess
import sys
import tarfile
import time

import pytest

from nanochat.common import REPO_ROOT, resolve_data_dir


def load_script(name):
    """scripts/ is not a package: load the script as a module (it runs nothing on import)."""
    spec = importlib.util.spec_from_file_location(f"{name}_script", REPO_ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


ra, tools, report = load_script("run_arm"), load_script("arm_tools"), load_script("make_report")
QUEUES = sorted((REPO_ROOT / "docs" / "runs" / "queues").glob("*.json"))
PLACEHOLDER_VALUES = {"LR_BASE": "1", "LR_MHC": "0.5", "EQ_TOKENS": "41943040", "EQ_TOKENS_D12": "39976960"}


def placeholder_values(queue) -> dict:
    text = queue.read_text()
    return {k: v for k, v in PLACEHOLDER_VALUES.items() if f'"{k}"' in text}


def test_tiny_defaults_apply_and_explicit_flags_win():
    arm = ra.parse_arm(["--tiny", "--mhc", "--depth", "3", "--name", "t1"])
    assert (arm["depth"], arm["data"], arm["tokenizer"], arm["device"]) == (3, "tinyshakespeare", "char", "cpu")
    assert arm["group"] == "mhc" and arm["limit_s"]["train"] == 240
    assert ra.parse_arm(["--mhc", "--mhc_preset", "prd"])["group"] == "mhc_prd"
    assert ra.stage_names(ra.parse_arm(["--name", "b"])) == ["train", "eval", "latency"]


def test_primary_rl_run_comes_before_eval_rl_and_the_rest_after():
    arm = ra.parse_arm(["--mhc", "--lr_sweep", "0.5,1,2", "--rl_runs", "per_layer-logprob,global-exact"])
    assert ra.stage_names(arm) == ["train_lr0.5", "train_lr1", "train_lr2", "eval", "hres", "latency", "sft",
                                   "eval_sft", "rl:per_layer-logprob", "eval_rl", "rl:global-exact"]


@pytest.mark.parametrize("argv, match", [
    (["--stages", "train,sft"], "need an mHC arm"),
    (["--mhc", "--rl_runs", "per_layer-accuracy"], "--rl_runs"),
    (["--limits", "train=fast"], "--limits"),
    (["--name", "a b"], "--name"),
    (["--lr_sweep", "0.5,1", "--eval_tokens", "0"], "needs --eval_tokens"),
    (["--stages", "train,evaluate"], "unknown"),
])
def test_bad_arm_flags_fail_before_any_work(argv, match):
    with pytest.raises(ValueError, match=match):
        ra.parse_arm(argv)


@pytest.mark.parametrize("queue", QUEUES, ids=lambda p: p.name)
def test_shipped_queues_parse_and_need_only_carried_data(queue):
    arms = ra.load_queue([queue], placeholder_values(queue))
    copies, packed = tools.carry_files(4)
    carried = set(copies) | set(packed)
    for arm in arms:
        assert arm["name"].startswith(queue.name.split("_")[0] + "-"), "arm ids start with their session"
        assert set(ra.required_files(arm)) <= carried, arm["name"]
        assert arm["target_tokens"] <= 44040192, "at most 2 passes over the 4 carried shards"


def test_arm_names_are_unique_across_queues():
    names = [a["name"] for q in QUEUES for a in ra.load_queue([q], placeholder_values(q))]
    assert len(names) == len(set(names))


def test_queue_placeholders_must_all_be_set(tmp_path):
    queue = tmp_path / "q.json"
    queue.write_text(json.dumps({"arms": [["--name", "a", "--lr_scale", "LR_X"]]}))
    with pytest.raises(ValueError, match="LR_X"):
        ra.load_queue([queue], {})
    with pytest.raises(ValueError, match="placeholders"):
        ra.load_queue([queue], {"LR_X": "1", "LR_Y": "2"})
    assert ra.load_queue([queue], {"LR_X": "0.25"})[0]["sweep"] == [0.25]


def test_several_queues_run_in_order_with_one_set_of_values(tmp_path):
    first, second = tmp_path / "q1.json", tmp_path / "q2.json"
    first.write_text(json.dumps({"defaults": ["--depth", "3"], "arms": [["--name", "a", "--lr_scale", "LR_X"]]}))
    second.write_text(json.dumps({"arms": [["--name", "b"], ["--name", "c", "--lr_scale", "LR_Y"]]}))
    arms = ra.load_queue([first, second], {"LR_X": "0.5", "LR_Y": "2"})
    assert [a["name"] for a in arms] == ["a", "b", "c"]
    assert arms[0]["depth"] == 3 and arms[1]["depth"] == ra.parse_arm(["--name", "b"])["depth"]  # defaults stay in their file
    assert (arms[0]["lr_scale"], arms[2]["lr_scale"]) == (0.5, 2.0)
    with pytest.raises(ValueError, match="LR_Y"):
        ra.load_queue([first, second], {"LR_X": "0.5"})
    with pytest.raises(ValueError, match="arm names repeat"):
        ra.load_queue([first, first], {"LR_X": "0.5"})


def test_check_data_names_what_is_missing_and_accepts_xz(tmp_path):
    arm = ra.parse_arm(["--name", "a", "--max_shards", "1", "--stages", "train"])
    with pytest.raises(FileNotFoundError, match="enwiki2015_train_00.txt.xz"):
        ra.check_data(tmp_path, [arm])
    for rel in ra.required_files(arm):
        path = tmp_path / (rel + (".xz" if rel.endswith("tiktoken") else ""))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
    ra.check_data(tmp_path, [arm])


def test_copy_data_unpacks_xz_but_keeps_corpus_text_compressed(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    (src / "gsm8k").mkdir(parents=True)
    (src / "enwiki2015").mkdir()
    (src / "gsm8k" / "test.jsonl.xz").write_bytes(lzma.compress(b'{"question": "q", "answer": "#### 1"}\n'))
    (src / "enwiki2015" / "enwiki2015_val.txt.xz").write_bytes(lzma.compress(b"text"))
    ra.copy_data(src, dst)
    assert (dst / "gsm8k" / "test.jsonl").read_bytes().startswith(b'{"question"')
    assert lzma.decompress((dst / "enwiki2015" / "enwiki2015_val.txt.xz").read_bytes()) == b"text"


def process_gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] == "Z"  # a zombie is dead, only not reaped yet
    except FileNotFoundError:
        return True


def test_stage_limit_stops_the_child_and_what_it_started(tmp_path):
    pid_file = tmp_path / "grandchild.pid"
    code = ("import subprocess, sys, time; "
            "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)']); "
            f"open({str(pid_file)!r}, 'w').write(str(p.pid)); time.sleep(120)")
    t0 = time.monotonic()
    result = ra.run_commands([[sys.executable, "-c", code]], tmp_path / "log", 3, dict(os.environ), tmp_path)
    assert result["status"] == "timeout" and time.monotonic() - t0 < 30
    grandchild = int(pid_file.read_text())
    for _ in range(50):
        if process_gone(grandchild):
            break
        time.sleep(0.1)
    assert process_gone(grandchild)
    assert "stopped at the stage limit" in (tmp_path / "log").read_text()


def test_failing_command_reports_its_exit_status_and_stops_the_stage(tmp_path):
    cmds = [[sys.executable, "-c", "raise SystemExit(3)"], [sys.executable, "-c", "print('never')"]]
    result = ra.run_commands(cmds, tmp_path / "log", 60, dict(os.environ), tmp_path)
    assert (result["status"], result["rc"]) == ("failed", 3)
    assert "never" not in (tmp_path / "log").read_text().split("SystemExit(3)")[1]


def test_stage_after_the_deadline_is_skipped_without_running(tmp_path):
    (tmp_path / "code").symlink_to(REPO_ROOT)
    arm = ra.parse_arm(["--tiny", "--name", "late"])
    job = dict(device="cpu", commit="c", site=None, command="x", device_name="cpu", torch="t")
    arm_status = {"stages": [{"name": s} for s in ra.stage_names(arm)], "current": None}
    run = ra.ArmRun(arm, tmp_path, job, {"arms": [arm_status]}, arm_status)
    record = run.run_stage("train", deadline=time.time() - 1)
    assert (record["status"], record["note"]) == ("skipped", "job deadline reached")
    assert not (tmp_path / "arms" / "late" / "logs").exists()
    assert run.run_stage("eval", deadline=time.time() + 600)["note"] == "no trained model"


def test_pack_drops_optional_files_first_when_too_big(tmp_path):
    pack = tmp_path / "pack" / "a1"
    (pack / "logs").mkdir(parents=True)
    (pack / "logs" / "train.log").write_bytes(os.urandom(300_000))  # incompressible
    (pack / "ledger_entry.json").write_text("{}")
    (pack / "hres").mkdir()
    (pack / "hres" / "hres.npz").write_bytes(os.urandom(20_000))
    left_out = ra.make_tarball(tmp_path / "pack", tmp_path / "out.tar.gz", limit=100_000)
    assert left_out == ["a1/logs/train.log"]
    with tarfile.open(tmp_path / "out.tar.gz") as tar:
        assert sorted(tar.getnames()) == ["a1/hres/hres.npz", "a1/ledger_entry.json"]


def test_ledger_writer_and_report_agree_on_the_fields():
    assert tools.LEDGER_FIELDS == report.REQUIRED_FIELDS


# ----------------------------------------------------------------------------- the whole job on a CPU


def tiny_data_dir(tmp_path):
    """The bundled files a tiny run reads, linked; GSM8K test xz-compressed to exercise unpacking."""
    src, data = resolve_data_dir(), tmp_path / "data"
    for rel in ["tinyshakespeare/input.txt", "gsm8k/train.jsonl", "hellaswag/hellaswag_val.jsonl"] + [
            f"arc/{s}/{s}-{split}.jsonl" for s in ("ARC-Easy", "ARC-Challenge") for split in ("Train", "Test")]:
        (data / rel).parent.mkdir(parents=True, exist_ok=True)
        (data / rel).symlink_to(src / rel)
    (data / "gsm8k" / "test.jsonl.xz").write_bytes(lzma.compress((src / "gsm8k" / "test.jsonl").read_bytes(), preset=0))
    return data


@pytest.mark.slow
def test_cpu_dry_run_of_every_stage_packs_artifacts_and_ledger_entries(tmp_path):
    pytest.importorskip("stable_baselines3")
    if not (resolve_data_dir() / "tinyshakespeare").is_dir():
        pytest.skip("bundled data not present")
    queue = tmp_path / "queue.json"
    queue.write_text(json.dumps({"defaults": ["--tiny"], "arms": [
        ["--name", "e2e-base", "--stages", "train,eval", "--eval_tasks", "bpb,hellaswag"],
        ["--name", "e2e-mhc", "--mhc"]]}))
    root, out = tmp_path / "arms", tmp_path / "out"
    env = dict(os.environ, NANOCHAT_COMMIT="test1234", OMP_NUM_THREADS="1")
    script = str(REPO_ROOT / "scripts" / "run_arm.py")
    start = subprocess.run([sys.executable, script, "start", "--queue", str(queue), "--data_dir",
                            str(tiny_data_dir(tmp_path)), "--arm_root", str(root), "--wheels", ""],
                           capture_output=True, text=True, env=env, timeout=120)
    assert start.returncode == 0, start.stdout + start.stderr
    poll = subprocess.run([sys.executable, script, "poll", "--arm_root", str(root), "--wait_s", "900",
                           "--out", str(out)], capture_output=True, text=True, env=env, timeout=1000)
    assert poll.returncode == 0 and "job done" in poll.stdout, poll.stdout + poll.stderr
    status = json.loads((out / "arm_status.json").read_text())
    entries = {e["arm_id"]: e for e in status["entries"]}
    assert set(entries) == {"e2e-base", "e2e-mhc"}
    for entry in entries.values():
        assert tuple(entry) == tools.LEDGER_FIELDS
        assert entry["status"] == "complete", entry["stages"]
        assert entry["commit"] == "test1234" and entry["tokens_trained"] == 1536 and entry["passes"] > 0
        assert entry["stage_commands"]["train"][0].startswith("python3 $ARM_ROOT/code/scripts/base_train.py")
    base, mhc = entries["e2e-base"]["metrics"], entries["e2e-mhc"]["metrics"]
    assert {"train.val_bpb", "train.steady_seconds", "eval.bpb.bpb", "eval.hellaswag_0shot.acc_norm"} <= set(base)
    assert {"eval.gsm8k_8shot.exact_match_strict", "eval_sft.bpb.bpb", "eval_rl.bpb.bpb", "latency.ms_per_token_b1",
            "sft.after.test_strict", "mhc.hres_diag_mean"} <= set(mhc)
    rl = entries["e2e-mhc"]["rl"]["per_layer-logprob"]
    assert {"rl", "learned_default", "best_constant", "gate_0", "gate_1"} == set(rl["policies"])
    assert len(entries["e2e-mhc"]["rl_baked"]["gates"]) == 2  # per-layer gates of the d2 model
    with tarfile.open(out / "arm_pack.tar.gz") as tar:
        names = tar.getnames()
    assert {"e2e-mhc/hres/hres.npz", "e2e-mhc/rl/per_layer-logprob/report.json", "e2e-mhc/train/metrics.jsonl",
            "e2e-base/eval/results.json", "e2e-mhc/run.json"} <= set(names)
    assert not [n for n in names if n.endswith((".pt", ".zip"))], "checkpoints and policies stay on the machine"
    # the report reads the pack: every column of the d2 table has a val bpb
    runs = tmp_path / "runs"
    report.main(["--runs_dir", str(runs), "--out_md", str(tmp_path / "results.md"), "--fig_dir", str(tmp_path / "figs"),
                 "--ingest", str(out / "arm_pack.tar.gz")])
    row = next(line for line in (tmp_path / "results.md").read_text().splitlines() if line.startswith("| val bpb |"))
    assert report.NO_DATA not in row
    rebuilt = tools.ledger_entry(runs / "artifacts" / "e2e-mhc")  # an entry is a function of its artifacts
    assert rebuilt["metrics"] == entries["e2e-mhc"]["metrics"]

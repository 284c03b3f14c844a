"""Reliability under faults (docs/reliability.md): SIGKILL at any moment (scripts/kill_resume_test.py),
preemption signals, NaN/Inf steps, full disks and failed saves, the SLURM requeue path. The bad-input
catalogue and the over-long prompts are in tests/test_bad_inputs.py."""

import errno
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

import nanochat.checkpoint as ckpt_mod
from nanochat.checkpoint import (capture_rng_state, complete_interrupted_copies, load_checkpoint,
                                 remove_stale_temp_files, save_checkpoint)
from nanochat.common import REPO_ROOT
from nanochat.gpt import GPTConfig, build_model
from nanochat.optim import build_optimizers
from nanochat.report import read_metrics
from nanochat.tokenizer import get_tokenizer

from base_train_helpers import BASE_TRAIN, load_base_train, one_thread, tiny_flags, token_cache  # noqa: F401

HARNESS = REPO_ROOT / "scripts" / "kill_resume_test.py"
SBATCH = REPO_ROOT / "runs" / "slurm_multinode.sbatch"
TINY = tiny_flags(total_batch_size=64, eval_every=0)


base_train = load_base_train()


def train(run_dir, *extra):
    return base_train.main(TINY + ["--out_dir", str(run_dir), *extra])


def pt_files(run_dir) -> dict:
    """Every checkpoint file of a run folder and its bytes (temporary files included)."""
    return {p.name: p.read_bytes() for p in sorted(run_dir.iterdir()) if ".pt" in p.name}


def env_for(token_cache) -> dict:
    return {**os.environ, "NANOCHAT_CACHE_DIR": str(token_cache), "OMP_NUM_THREADS": "1"}


# ----------------------------------------------------------------------------- kill at any moment


def run_harness(tmp_path, token_cache, *flags, timeout=900) -> dict:
    out = subprocess.run([sys.executable, str(HARNESS), "--out_dir", str(tmp_path / "kill"), *flags],
                         capture_output=True, text=True, timeout=timeout, env=env_for(token_cache), cwd=REPO_ROOT)
    report_path = tmp_path / "kill" / "report.json"
    assert report_path.is_file(), out.stdout[-3000:] + out.stderr[-3000:]
    report = json.loads(report_path.read_text())
    assert out.returncode == 0 and report["verdict"] == "PASS", report.get("summary", out.stdout[-3000:])
    return report


@pytest.mark.slow
def test_twenty_sigkills_then_the_same_final_weights(tmp_path, token_cache):
    """SIGKILL 20 times (during startup, steps and checkpoint writes; a save every step), resume each time
    with --resume auto: every checkpoint stays loadable and final.pt equals the uninterrupted run's."""
    report = run_harness(tmp_path, token_cache, "--launch", "fork", "--kills", "20", "--steps", "50")
    kills = report["kills"]
    assert len(kills) >= 20
    assert {k["kind"] for k in kills} == {"startup", "step", "save"}
    assert report["kills_during_write"] >= 3  # killed with a temporary checkpoint file half written
    assert not any(k["unreadable"] for k in kills)
    assert report["comparison"]["weights_equal"] and report["comparison"]["max_loss_diff"] == 0.0
    assert report["comparison"]["best_steps"][0] == report["comparison"]["best_steps"][1]


@pytest.mark.slow
def test_one_rank_killed_under_torchrun(tmp_path, token_cache):
    """torchrun, 2 gloo ranks: SIGKILL one rank; torchrun ends the other (no hang) and the run resumes
    to the same final weights as an uninterrupted 2-rank run."""
    report = run_harness(tmp_path, token_cache, "--nproc", "2", "--kills", "2", "--steps", "20")
    assert len(report["kills"]) == 2 and all(k["ranks"] == 2 for k in report["kills"])
    assert all(k["exit_code"] not in (0, None) and not k["survivors"] for k in report["kills"])
    assert max(k["teardown_s"] for k in report["kills"]) < 60
    assert report["comparison"]["weights_equal"]


def test_interrupted_copies_and_temp_files_are_repaired(tmp_path, monkeypatch):
    """A kill between writing ckpt_N and copying it to best.pt / final.pt, and a kill during a write:
    the resume makes the missing copies and deletes the dead writer's temporary file."""
    tok = get_tokenizer("char")
    model = build_model(GPTConfig.from_depth(1, vocab_size=tok.vocab_size, sequence_len=16), "cpu", seed=0)
    opts = build_optimizers(model, "adamw")
    save_checkpoint(tmp_path, 1, model, opts, {}, None, capture_rng_state("cpu"), tokenizer=tok, best=True)

    def killed(src, dst):
        raise KeyboardInterrupt("killed between the checkpoint and its copies")

    with monkeypatch.context() as m:
        m.setattr(ckpt_mod, "_atomic_copy", killed)
        with pytest.raises(KeyboardInterrupt):
            save_checkpoint(tmp_path, 2, model, opts, {}, None, None, tokenizer=tok, best=True, final=True)
    assert load_checkpoint(tmp_path / "best.pt")["step"] == 1 and not (tmp_path / "final.pt").exists()
    dead_pid = os.fork()  # a writer that has exited
    if dead_pid == 0:
        os._exit(0)
    os.waitpid(dead_pid, 0)
    (tmp_path / f".ckpt_000003.pt.tmp-{dead_pid}").write_bytes(b"half a checkpoint")
    (tmp_path / f".ckpt_000003.pt.tmp-{os.getpid()}").write_bytes(b"a live writer's")
    path = tmp_path / "ckpt_000002.pt"
    assert complete_interrupted_copies(tmp_path, path, load_checkpoint(path)) == ["best.pt", "final.pt"]
    assert load_checkpoint(tmp_path / "best.pt")["step"] == 2 and load_checkpoint(tmp_path / "final.pt")["step"] == 2
    assert complete_interrupted_copies(tmp_path, path, load_checkpoint(path)) == []  # nothing left to do
    assert [p.name for p in remove_stale_temp_files(tmp_path)] == [f".ckpt_000003.pt.tmp-{dead_pid}"]
    assert (tmp_path / f".ckpt_000003.pt.tmp-{os.getpid()}").exists()


def test_kill_after_the_last_save_still_leaves_final_pt(tmp_path):
    """Killed after ckpt_N of the last step but before final.pt: --resume finds the run finished and
    makes final.pt instead of leaving the run without one."""
    train(tmp_path, "--num_iterations", "2", "--save_every", "1")
    (tmp_path / "final.pt").unlink()
    assert train(tmp_path, "--num_iterations", "2", "--save_every", "1", "--resume") is None  # nothing to train
    assert load_checkpoint(tmp_path / "final.pt")["step"] == 2


# ----------------------------------------------------------------------------- preemption


def wait_for_line(proc, pattern: str, timeout: float) -> re.Match:
    end = time.time() + timeout
    while time.time() < end:
        line = proc.stdout.readline()
        if not line:
            break
        if m := re.search(pattern, line):
            return m
    raise AssertionError(f"no line matching {pattern!r} within {timeout} s")


@pytest.mark.slow
def test_sigterm_saves_within_one_step_and_exits_zero(tmp_path, token_cache):
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, str(BASE_TRAIN), *TINY, "--out_dir", str(run), "--num_iterations", "40",
                             "--save_every", "0"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env_for(token_cache))
    try:
        seen = int(wait_for_line(proc, r"^step (\d+)/40", 300).group(1))
        proc.send_signal(signal.SIGTERM)
        rest = proc.communicate(timeout=120)[0]
    finally:
        proc.kill()
    assert proc.returncode == 0, rest[-3000:]
    saved = [p.name for p in run.glob("ckpt_*.pt")]
    assert len(saved) == 1 and not (run / "final.pt").exists()  # a preemption save is not final
    step = load_checkpoint(run / saved[0])["step"]
    assert seen <= step <= seen + 2  # the step in flight when the signal came, or the one after
    summary = json.loads((run / "summary.json").read_text())
    assert summary["stop_reason"] == "signal SIGTERM" and summary["steps"] == step
    assert f"stopped by signal SIGTERM at step {step} after saving a checkpoint" in (run / "train.log").read_text()
    # the same command plus --resume continues from there to the end
    resumed = train(run, "--num_iterations", "40", "--save_every", "0", "--resume")
    assert resumed["steps"] == 40 and resumed["steps_this_run"] == 40 - step
    assert load_checkpoint(run / "final.pt")["step"] == 40


@pytest.mark.slow
def test_sigusr1_under_torchrun_as_slurm_sends_it(tmp_path, token_cache):
    """runs/slurm_multinode.sbatch's wrapper (torchrun with SIGUSR1 ignored) and SIGUSR1 to torchrun and
    to rank 1 only: torchrun lives on, both ranks stop after the same step, rank 0 saves, exit 0."""
    wrapper = re.search(r"srun [^\n]*?(bash -c '[^']*')", SBATCH.read_text()).group(1)
    run = tmp_path / "run"
    cmd = (f"exec {wrapper} usr1-test {sys.executable} -m torch.distributed.run --standalone --nproc_per_node=2 "
           f"{BASE_TRAIN} {' '.join(TINY)} --total_batch_size 128 --num_iterations 40 --save_every 0 --out_dir {run}")
    proc = subprocess.Popen(["bash", "-c", cmd], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env_for(token_cache), start_new_session=True)
    try:
        wait_for_line(proc, r"^step \d+/40", 300)
        workers = [int(c) for c in open(f"/proc/{proc.pid}/task/{proc.pid}/children").read().split()]
        ranks = {int(dict(kv.split("=", 1) for kv in open(f"/proc/{w}/environ").read().split("\0") if "=" in kv)
                     ["RANK"]): w for w in workers}
        os.kill(proc.pid, signal.SIGUSR1)  # torchrun itself (exec'd in place of bash): must ignore it
        os.kill(ranks[1], signal.SIGUSR1)
        rest = proc.communicate(timeout=180)[0]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, rest[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["stop_reason"].startswith("signal") and summary["rank_weight_max_diff"] == 0.0
    assert load_checkpoint(next(run.glob("ckpt_*.pt")))["step"] == summary["steps"] < 40


def test_slurm_launcher_requeues_and_resumes():
    text = SBATCH.read_text()
    assert "#SBATCH --signal=USR1@120" in text and "#SBATCH --requeue" in text
    assert "--resume auto" in text and 'scontrol requeue "$SLURM_JOB_ID"' in text
    wrapper = re.search(r"srun [^\n]*?(bash -c '[^']*')", text).group(1)
    out = subprocess.run(["bash", "-c", f"{wrapper} x {sys.executable} -c "
                                        f"'import signal; print(signal.getsignal(signal.SIGUSR1) == signal.SIG_IGN)'"],
                         capture_output=True, text=True)
    assert out.stdout.strip() == "True", out  # what torchrun runs with: SIGUSR1 cannot kill it


# ----------------------------------------------------------------------------- non-finite values


def test_nan_steps_are_skipped_and_counted(tmp_path):
    """A NaN loss at steps 2 and 4 (of 4): no update at either, training goes on in between, no periodic
    save of step 2, and the final save (step 4) holds exactly step 3's weights and optimizer state."""
    summary = train(tmp_path, "--num_iterations", "4", "--save_every", "1", "--keep_last", "10",
                    "--debug_inject_nan_steps", "2,4")
    assert summary["steps"] == 4 and summary["nonfinite_steps"] == 2 and summary["final_loss"] is None
    assert sorted(p.name for p in tmp_path.glob("ckpt_*.pt")) == ["ckpt_000001.pt", "ckpt_000003.pt", "ckpt_000004.pt"]
    before, after = load_checkpoint(tmp_path / "ckpt_000003.pt"), load_checkpoint(tmp_path / "final.pt")
    assert after["step"] == 4 and all(torch.equal(before["model"][k], after["model"][k]) for k in before["model"])
    assert torch.equal(before["optimizer"][0]["state"][0]["step"], after["optimizer"][0]["state"][0]["step"])
    losses = {r["step"]: r["loss"] for r in read_metrics(tmp_path) if "loss" in r and "event" not in r}
    assert losses[2] == losses[4] == "nan" and all(isinstance(losses[s], float) for s in (1, 3))
    log = (tmp_path / "train.log").read_text()
    assert "warning: step 2: loss nan / grad norm nan is not finite; update skipped (1 in a row, 1 in all)" in log
    assert "warning: step 4: loss nan / grad norm nan is not finite; update skipped (1 in a row, 2 in all)" in log


def test_nonfinite_steps_in_a_row_stop_the_run_and_keep_the_last_checkpoint(tmp_path):
    train(tmp_path, "--num_iterations", "4", "--save_every", "2")
    before = pt_files(tmp_path)
    with pytest.raises(SystemExit, match=r"steps 5\.\.7 all had a non-finite loss .* stopped at step 7 without "
                                         r"saving; the last checkpoint ckpt_000004\.pt is untouched"):
        train(tmp_path, "--num_iterations", "10", "--save_every", "2", "--resume", "--debug_inject_nan_steps",
              "5,6,7", "--max_nonfinite_steps", "3")
    assert pt_files(tmp_path) == before  # ckpt_000006 would have been a save of skipped steps: none


# ----------------------------------------------------------------------------- disk full, unwritable


def test_full_disk_is_refused_before_training(tmp_path, monkeypatch):
    monkeypatch.setattr(ckpt_mod.shutil, "disk_usage", lambda path: type("Usage", (), {"free": 10_000})())
    with pytest.raises(SystemExit, match=r"not enough disk space in .*: 9\.8 KiB free, but checkpoints need about .* "
                                         r"lower --keep_last, or choose another --out_dir"):
        train(tmp_path / "run", "--num_iterations", "2")
    assert not (tmp_path / "run").exists()


def test_unwritable_output_folder_is_refused_before_training(tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(ckpt_mod.tempfile, "mkstemp", refuse)  # as root, chmod cannot make a folder unwritable
    with pytest.raises(SystemExit, match=rf"cannot write to {tmp_path} \(Permission denied\); fix its permissions"):
        train(tmp_path / "run", "--num_iterations", "2")
    assert not (tmp_path / "run").exists()


def test_failed_save_never_replaces_the_last_good_checkpoint(tmp_path, monkeypatch):
    """ENOSPC half-way through writing step 4: ckpt_000002.pt, best.pt and final.pt stay byte for byte,
    no partial file remains, the run stops with one line."""
    train(tmp_path, "--num_iterations", "2", "--save_every", "2")
    before = pt_files(tmp_path)
    assert set(before) == {"ckpt_000002.pt", "best.pt", "final.pt"}
    real_save = torch.save

    def disk_full(obj, f, *args, **kwargs):
        real_save({"partial": torch.zeros(1000)}, f)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt_mod.torch, "save", disk_full)
    with pytest.raises(SystemExit, match=r"saving the step 4 checkpoint in .* failed \(No space left on device\); "
                                         r"ckpt_000002\.pt is intact"):
        train(tmp_path, "--num_iterations", "4", "--save_every", "2", "--resume")
    assert pt_files(tmp_path) == before


def test_save_checkpoint_on_a_full_disk_leaves_best_and_final_untouched(tmp_path, monkeypatch):
    tok = get_tokenizer("char")
    model = build_model(GPTConfig.from_depth(1, vocab_size=tok.vocab_size, sequence_len=16), "cpu", seed=0)
    save_checkpoint(tmp_path, 1, model, build_optimizers(model, "adamw"), {}, tokenizer=tok, best=True, final=True)
    before = pt_files(tmp_path)
    real_copy = ckpt_mod.shutil.copyfile

    def copy_until_full(src, dst):
        real_copy(src, dst)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt_mod.shutil, "copyfile", copy_until_full)  # the checkpoint fits, its best.pt copy not
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint(tmp_path, 2, model, None, {}, tokenizer=tok, best=True, final=True)
    after = pt_files(tmp_path)
    assert after["best.pt"] == before["best.pt"] and after["final.pt"] == before["final.pt"]
    assert set(after) == {"ckpt_000001.pt", "ckpt_000002.pt", "best.pt", "final.pt"}  # no temporary file
    # the next resume finishes what the full disk interrupted, once there is room again
    monkeypatch.undo()
    path = tmp_path / "ckpt_000002.pt"
    assert complete_interrupted_copies(tmp_path, path, load_checkpoint(path)) == ["best.pt", "final.pt"]

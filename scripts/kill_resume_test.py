"""Kill a training run at random moments, resume it every time, and check that it ends exactly where the
same run ends without interruption (docs/reliability.md).

    python scripts/kill_resume_test.py                                  # CPU: 20 kills of a tiny model
    python scripts/kill_resume_test.py --launch fork                    # the same, ~5 s less per restart
    python scripts/kill_resume_test.py --nproc 2 --kills 3 --steps 16   # torchrun + gloo: one rank is killed
    python scripts/kill_resume_test.py --device cuda --depth 6 --dtype bfloat16 --compile --kills 20 \\
        --steps 300 --save_every 5 --time_limit_s 420 --data_dir .carry/data       # one GPU, a few minutes

1. Reference: the run without interruption (twice on CUDA, to measure the run-to-run noise of GPU
   kernels), saving every --save_every steps into ref/ (ref2/).
2. The same command plus --resume auto in killed/, started again and again. Each start gets SIGKILL
   (under torchrun: one rank, picked at random) at one of three kinds of moment, drawn at random:
   'startup' (a random time before it can have trained), 'step' (a random time after it made
   progress) or 'save' (the moment a checkpoint or best/final copy is being written: its temporary
   file exists). After every kill: no process of the run may outlive --teardown_timeout_s (torchrun
   must tear the other rank down), and every checkpoint in the folder must load (weights_only).
3. The last start runs to the end. Verdict: final.pt and the per-step losses against the reference:
   bit-identical weights (CPU; GPU with --deterministic when its kernels allow), else losses within
   --tolerance, else (GPU only) within 3x the reference-vs-reference difference.

--launch exec runs `python scripts/base_train.py` (or torchrun) each time, as a user would. --launch
fork (CPU, one process) forks this interpreter, which imported torch once, and calls the same
base_train.main: the same code and files, without ~5 s of interpreter start per restart (CI).
Writes --out_dir/report.json (also after every kill, with verdict 'unfinished', in case the harness
itself is stopped); prints one verdict line; exit status 0 (PASS) or 1 (FAIL).
"""

import argparse
import importlib.util
import json
import os
import random
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BASE_TRAIN = REPO / "scripts" / "base_train.py"
KILL_KINDS = ("startup", "step", "save")
KIND_WEIGHTS = (0.15, 0.45, 0.40)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--kills", type=int, default=20, help="SIGKILLs to deliver across the run")
    p.add_argument("--steps", type=int, default=60, help="optimizer steps of the run (--num_iterations)")
    p.add_argument("--save_every", type=int, default=1, help="checkpoint cadence: every step makes saves frequent")
    p.add_argument("--nproc", type=int, default=1, help="ranks: 1 (plain python) or more (torchrun, one rank killed)")
    p.add_argument("--launch", default="exec", choices=["exec", "fork"],
                   help="exec: a fresh interpreter per start; fork: fork this one (CPU, --nproc 1)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--depth", type=int, default=2)
    p.add_argument("--n_embd", type=int, default=None, help="width (default: 64 on CPU, 64 * depth on CUDA)")
    p.add_argument("--max_seq_len", type=int, default=None, help="default: 32 on CPU, 256 on CUDA")
    p.add_argument("--device_batch_size", type=int, default=None, help="default: 2 on CPU, 32 on CUDA")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--compile", action="store_true", help="torch.compile the model (CUDA)")
    p.add_argument("--deterministic", action=argparse.BooleanOptionalAction, default=None,
                   help="pass --deterministic to base_train (default: on for CUDA)")
    p.add_argument("--data", default="tinyshakespeare")
    p.add_argument("--data_dir", default=None, help="the data folder (default: base_train's)")
    p.add_argument("--seed", type=int, default=0, help="seed of the kill schedule")
    p.add_argument("--references", type=int, default=None,
                   help="uninterrupted reference runs (default: 2 on CUDA, to measure its run-to-run noise; else 1)")
    p.add_argument("--tolerance", type=float, default=1e-6, help="largest per-step loss difference accepted")
    p.add_argument("--teardown_timeout_s", type=float, default=90.0,
                   help="longest a killed run may take to end all its processes")
    p.add_argument("--time_limit_s", type=float, default=0.0,
                   help="stop killing once this many seconds have passed (0: no limit); the run then finishes")
    p.add_argument("--out_dir", default=None, help="work folder (default: out/kill_resume/<date>)")
    p.add_argument("extra", nargs="*", help="more base_train flags, after --")
    args = p.parse_args(argv)
    cuda = args.device == "cuda"
    defaults = dict(n_embd=None if cuda else 64, max_seq_len=256 if cuda else 32, device_batch_size=32 if cuda else 2,
                    deterministic=cuda, references=2 if cuda else 1)
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.kills < 0 or args.steps < 4 or args.save_every < 1 or args.nproc < 1 or args.references not in (1, 2):
        p.error("need --kills >= 0, --steps >= 4, --save_every >= 1, --nproc >= 1, --references 1 or 2")
    if args.launch == "fork" and (args.nproc > 1 or cuda):
        p.error("--launch fork is for one CPU process (forking after CUDA or under torchrun is unsafe)")
    return args


def base_train_flags(args, run_dir: Path) -> list[str]:
    """One run's flags: dropout and mHC gate noise on, so that the RNG state must survive resumes too."""
    tokens_per_step = args.device_batch_size * args.max_seq_len * args.nproc
    flags = ["--depth", str(args.depth), "--max_seq_len", str(args.max_seq_len),
             "--device_batch_size", str(args.device_batch_size), "--total_batch_size", str(tokens_per_step),
             "--num_iterations", str(args.steps), "--save_every", str(args.save_every), "--keep_last", "2",
             "--data", args.data, "--tokenizer", "char", "--device", args.device, "--dtype", args.dtype,
             "--mhc_enabled", "--mhc_gate_noise", "0.2", "--dropout", "0.1", "--eval_tokens",
             str(args.max_seq_len * 8 * args.nproc), "--eval_every", "0", "--sample_every", "-1",
             "--log_every", "10", "--out_dir", str(run_dir), "--compile" if args.compile else "--no-compile"]
    if args.n_embd:
        flags += ["--n_embd", str(args.n_embd)]
    if args.data_dir:
        flags += ["--data_dir", args.data_dir]
    if args.deterministic:
        flags.append("--deterministic")
    return flags + list(args.extra)


# ----------------------------------------------------------------------------- processes


class Run:
    """One start of base_train: a process group (exec) or a forked child (fork)."""

    def __init__(self, args, flags: list[str], log_path: Path):
        self.launch, self.t0, self.nproc = args.launch, time.time(), args.nproc
        self.returncode, self.workers = None, []
        if args.launch == "fork":
            self.pid = fork_base_train(flags, log_path)
            return
        if args.nproc > 1:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}",
                   str(BASE_TRAIN), *flags]
        else:
            cmd = [sys.executable, str(BASE_TRAIN), *flags]
        self.log = open(log_path, "ab")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, cwd=REPO,
                                     start_new_session=True)  # its own group: one killpg ends it all
        self.pid = self.proc.pid

    def poll(self):
        if self.returncode is None:
            if self.launch == "fork":
                pid, status = os.waitpid(self.pid, os.WNOHANG)
                if pid:
                    self.returncode = os.waitstatus_to_exitcode(status)
            else:
                self.returncode = self.proc.poll()
        return self.returncode

    def wait(self, timeout: float):
        end = time.time() + timeout
        while self.poll() is None and time.time() < end:
            time.sleep(0.02)
        return self.returncode

    def victims(self, deadline: float) -> list[int]:
        """The training processes: torchrun's workers (waiting until they exist), else the process."""
        if self.nproc == 1:  # no torchrun: the run is the one process
            return [self.pid]
        while self.poll() is None and time.time() < deadline:
            # torchrun starts each worker in a session of its own: remember them, to clean up. Wait
            # for all of them, and only base_train's ranks (not a short-lived helper torchrun runs)
            ranks = [pid for pid in children(self.pid) if "base_train.py" in cmdline(pid)]
            self.workers = sorted(set(self.workers) | set(ranks))
            if len(ranks) >= self.nproc:
                return ranks
            time.sleep(0.01)
        return [pid for pid in self.workers if alive(pid)]

    def kill_all(self):
        """SIGKILL to the whole run (torchrun's workers are outside its process group)."""
        for pid in self.workers:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.wait(10)


def fork_base_train(flags: list[str], log_path: Path) -> int:
    """base_train.main(flags) in a forked child with its own session and log; returns the pid."""
    module = load_base_train()
    pid = os.fork()
    if pid:
        return pid
    code = 1
    try:
        os.setsid()
        fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        module.main(flags)
        code = 0
    except SystemExit as e:  # what the interpreter would do with it
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


_BASE_TRAIN = None


def load_base_train():
    global _BASE_TRAIN
    if _BASE_TRAIN is None:
        spec = importlib.util.spec_from_file_location("base_train", BASE_TRAIN)
        _BASE_TRAIN = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(_BASE_TRAIN)
        importlib.import_module("torch._dynamo")  # the meta-device build imports it lazily (~4 s): do it once
    return _BASE_TRAIN


def children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def alive(pid: int) -> bool:
    """Running (a zombie waiting for its parent does not count)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


# ----------------------------------------------------------------------------- run folder


def latest_step(run_dir: Path) -> int:
    steps = [int(p.name[5:-3]) for p in run_dir.glob("ckpt_*.pt")] if run_dir.is_dir() else []
    return max(steps, default=0)


def temp_files(run_dir: Path) -> list[str]:
    return [p.name for p in run_dir.glob(".*.tmp-*")] if run_dir.is_dir() else []


def saving_beyond(run_dir: Path, step: int) -> bool:
    """A checkpoint after `step` (or a best/final copy) is being written right now (by a live writer:
    an earlier kill's leftover does not count)."""
    for name in temp_files(run_dir):
        if not alive(int(name.rsplit("-", 1)[1])):
            continue
        if name.startswith(".ckpt_"):
            if int(name[6:name.index(".pt")]) > step:
                return True
        else:
            return True
    return False


def unreadable_checkpoints(run_dir: Path) -> list[str]:
    from nanochat.checkpoint import load_checkpoint

    bad = []
    for path in sorted(run_dir.glob("*.pt")):
        try:
            load_checkpoint(path)
        except Exception as e:  # noqa: BLE001 - any failure to load is the finding
            bad.append(f"{path.name}: {e}")
    return bad


def step_losses(run_dir: Path) -> dict[int, float]:
    """The loss of every step; a step run again after a resume replaces its earlier record."""
    losses = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line torn by a kill
        if "loss" in record and "event" not in record:
            losses[record["step"]] = float(record["loss"])
    return losses


def compare(run_a: Path, run_b: Path) -> dict:
    """Final weights and per-step losses of two run folders."""
    import torch

    from nanochat.checkpoint import load_checkpoint

    a, b = load_checkpoint(run_a / "final.pt"), load_checkpoint(run_b / "final.pt")
    weights_equal = a["model"].keys() == b["model"].keys() and all(torch.equal(a["model"][k], b["model"][k])
                                                                     for k in a["model"])
    max_weight_diff = max((a["model"][k].double() - b["model"][k].double()).abs().max().item() for k in a["model"])
    la, lb = step_losses(run_a), step_losses(run_b)
    missing = sorted(set(la) ^ set(lb))
    max_loss_diff = max((abs(la[s] - lb[s]) for s in la if s in lb), default=float("inf"))
    best = [(p / "best.pt").is_file() and load_checkpoint(p / "best.pt")["step"] for p in (run_a, run_b)]
    return dict(weights_equal=weights_equal, max_weight_diff=max_weight_diff, max_loss_diff=max_loss_diff,
                steps_missing=missing, final_steps=[a["step"], b["step"]], best_steps=best)


# ----------------------------------------------------------------------------- the test


def run_to_end(args, flags, log_path: Path, timeout: float) -> tuple[int | None, float]:
    run = Run(args, flags, log_path)
    code = run.wait(timeout)
    if code is None:
        run.kill_all()
    return code, time.time() - run.t0


def one_kill(args, run_dir: Path, log_path: Path, rng: random.Random, timing: dict, kind: str) -> dict:
    """Start the run with --resume auto, kill it at a `kind` moment, check what it leaves behind."""
    start_step = latest_step(run_dir)
    run = Run(args, base_train_flags(args, run_dir) + ["--resume", "auto"], log_path)
    deadline = run.t0 + timing["startup_s"] * 4 + timing["step_s"] * args.steps + 60
    if kind == "startup":
        run.victims(deadline)  # under torchrun: once the ranks exist (killing torchrun itself orphans them)
        time.sleep(rng.uniform(0, max(timing["startup_s"] - (time.time() - run.t0), 0.1)))
    else:
        want = start_step + (2 if kind == "save" else 1)  # 'save': the save of a step that is progress
        while run.poll() is None and time.time() < deadline:
            if kind == "save" and saving_beyond(run_dir, want - 1):
                break
            if kind == "step" and latest_step(run_dir) >= want:
                time.sleep(rng.uniform(0, 2 * timing["step_s"]))
                break
            time.sleep(0.001)
    record = dict(kind=kind, start_step=start_step, after_s=round(time.time() - run.t0, 3))
    if run.poll() is not None:  # it ended first: the run is over or it failed
        record.update(ended_by_itself=run.returncode)
        return record
    victims = run.victims(deadline)
    victim = rng.choice(victims) if victims else None
    writing = temp_files(run_dir)
    t_kill = time.time()
    killed = False
    if victim is not None:
        try:
            os.kill(victim, signal.SIGKILL)
            killed = True
        except ProcessLookupError:
            pass
    if not killed:  # the run ended between the checks above and the kill: no kill happened
        record.update(ended_by_itself=run.wait(args.teardown_timeout_s), victim_gone=victim)
        if run.returncode is None:
            run.kill_all()
        return record
    code = run.wait(args.teardown_timeout_s)
    if code == 0:  # it exited cleanly just before the signal (a SIGKILLed run never exits 0): no kill
        record.update(ended_by_itself=code, victim_gone=victim)
        return record
    survivors = [pid for pid in victims if alive(pid)]
    record.update(victim=victim, ranks=len(victims), writing_at_kill=writing, exit_code=code,
                  teardown_s=round(time.time() - t_kill, 3), survivors=survivors, step_at_kill=latest_step(run_dir))
    if code is None or survivors:
        run.kill_all()  # a hang: the verdict fails, and nothing may stay behind
    record["unreadable"] = unreadable_checkpoints(run_dir)
    return record


def measure_timing(run_dir: Path, wall_s: float, steps: int) -> dict:
    """Startup time and time per step of the reference run, from its log (for the kill schedule)."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    times = [r["time"] for r in records if "loss" in r and "event" not in r]
    step_s = (times[-1] - times[0]) / max(len(times) - 1, 1) if len(times) > 1 else 0.1
    return dict(startup_s=max(wall_s - step_s * steps, 0.5), step_s=max(step_s, 0.005))


def write_report(out: Path, report: dict):
    (out / "report.json").write_text(json.dumps(report, indent=2, default=str) + "\n")


def main(argv=None):
    args = parse_args(argv)
    if args.device == "cpu":
        os.environ.setdefault("OMP_NUM_THREADS", "1")  # tiny models: threads only contend
    out = Path(args.out_dir or REPO / "out" / "kill_resume" / time.strftime("%Y%m%d-%H%M%S")).resolve()
    out.mkdir(parents=True, exist_ok=True)
    for name in ("ref", "ref2", "killed"):
        if (out / name).exists():
            raise SystemExit(f"error: {out / name} exists; pick another --out_dir")
    os.environ.setdefault("NANOCHAT_CACHE_DIR", str(out / "cache"))
    if args.launch == "fork":
        load_base_train()  # import torch and the model once, before the first fork
    t_start, rng = time.time(), random.Random(args.seed)
    report = dict(args=vars(args), device=args.device)

    references = ["ref", "ref2"][:args.references]
    for name in references:
        code, wall = run_to_end(args, base_train_flags(args, out / name), out / f"{name}.log", 3600)
        if code != 0:
            raise SystemExit(f"error: the reference run failed (exit {code}); see {out / f'{name}.log'}")
        report[f"{name}_wall_s"] = round(wall, 1)
    # with --deterministic, torch names every op that has no deterministic kernel (the noise's source)
    report["nondeterministic_ops"] = sorted({line.strip()[:200] for line in (out / "ref.log").read_text().splitlines()
                                             if "deterministic" in line and "Warning" in line})
    timing = measure_timing(out / "ref", report["ref_wall_s"], args.steps)
    report["timing"] = timing
    print(f"reference: {report['ref_wall_s']} s ({timing['step_s'] * 1000:.0f} ms/step, startup "
          f"{timing['startup_s']:.1f} s)", flush=True)

    killed, kills = out / "killed", []
    while len(kills) < args.kills and latest_step(killed) < args.steps - 1:
        if args.time_limit_s and time.time() - t_start > args.time_limit_s:
            break
        kind = rng.choices(KILL_KINDS, KIND_WEIGHTS)[0]
        record = one_kill(args, killed, out / "killed.log", rng, timing, kind)
        if "ended_by_itself" in record:
            report["ended_early"] = record
            break
        kills.append(record)
        write_report(out, {**report, "kills": kills, "verdict": "unfinished"})
        print(f"kill {len(kills)}: {kind} after {record['after_s']:.2f} s, step {record['start_step']} -> "
              f"{record['step_at_kill']}, writing {record['writing_at_kill'] or '-'}, teardown "
              f"{record['teardown_s']:.2f} s" + (f", UNREADABLE {record['unreadable']}" if record["unreadable"] else ""),
              flush=True)
        if record["exit_code"] is None or record["survivors"]:
            break  # a hang: no point going on
    code, wall = run_to_end(args, base_train_flags(args, killed) + ["--resume", "auto"], out / "killed.log", 3600)
    report.update(kills=kills, final_exit_code=code, final_wall_s=round(wall, 1))

    verdict, reasons = "PASS", []
    hung = [k for k in kills if k["exit_code"] is None or k["survivors"]]
    unreadable = [k for k in kills if k["unreadable"]]
    if hung:
        reasons.append(f"{len(hung)} kill(s) left processes running past {args.teardown_timeout_s:.0f} s")
    if unreadable:
        reasons.append(f"unreadable checkpoints after {len(unreadable)} kill(s)")
    if code != 0:
        reasons.append(f"the final resume failed (exit {code}); see {out / 'killed.log'}")
    if len(kills) < args.kills and not args.time_limit_s:
        reasons.append(f"only {len(kills)} of {args.kills} kills happened (more --steps?)")
    how = ""
    if code == 0:
        result = compare(out / "ref", killed)
        report["comparison"] = result
        if "ref2" in references:
            report["noise"] = compare(out / "ref", out / "ref2")
        if result["steps_missing"] or result["final_steps"][0] != result["final_steps"][1]:
            reasons.append(f"steps differ: {result['steps_missing']} / {result['final_steps']}")
        elif result["weights_equal"]:
            how = "bit-identical final weights and losses"
        elif result["max_loss_diff"] <= args.tolerance:
            how = f"losses within {result['max_loss_diff']:.1e} <= {args.tolerance:g}"
        elif "noise" in report and report["noise"]["max_loss_diff"] > 0 and \
                result["max_loss_diff"] <= 3 * report["noise"]["max_loss_diff"]:
            how = (f"losses within {result['max_loss_diff']:.1e}, <= 3x the reference-vs-reference difference "
                   f"{report['noise']['max_loss_diff']:.1e} (the GPU kernels are not deterministic)")
        else:
            reasons.append(f"final weights differ (max {result['max_weight_diff']:.2e}) and losses differ by up to "
                           f"{result['max_loss_diff']:.2e}")
        if result["best_steps"][0] != result["best_steps"][1]:
            reasons.append(f"best.pt holds step {result['best_steps'][1]}, the reference's holds step "
                           f"{result['best_steps'][0]}")
    if reasons:
        verdict = "FAIL"
    during_write = sum(bool(k["writing_at_kill"]) for k in kills)
    kinds = ", ".join(f"{sum(k['kind'] == c for k in kills)} {c}" for c in KILL_KINDS)
    summary = (f"{verdict}: {len(kills)} SIGKILLs ({kinds}; {during_write} while a checkpoint file was being "
               f"written), {args.nproc} rank(s), {args.device}, "
               f"{args.steps} steps; " + ("; ".join(reasons) if reasons else how) +
               f"; {time.time() - t_start:.0f} s in all")
    report.update(verdict=verdict, reasons=reasons, summary=summary, kills_during_write=during_write,
                  wall_s=round(time.time() - t_start, 1))
    write_report(out, report)
    print(summary)
    print(f"report: {out / 'report.json'}")
    return 0 if verdict == "PASS" else 1


if __name__ == "__main__":
    sys.exit(main())

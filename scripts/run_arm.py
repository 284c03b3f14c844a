"""Run arms of the experiments (docs/experiments.md) on one GPU machine within one hold: pretrain,
evaluate, and for mHC arms fine-tune on GSM8K and tune the gates with PPO; then pack the small
artifacts and one ledger entry per arm (docs/runs/README.md). Checkpoints never leave the machine.

    python scripts/arm_tools.py prepare-carry --shards 4 --out .carry/exp     # here: the data to carry
    python3 scripts/run_arm.py start --queue docs/runs/queues/s1_d4.json --data_dir .carry/exp --wheels .whl
    python3 scripts/run_arm.py poll --wait_s 560     # progress; packs every arm's artifacts into $OUT
    python scripts/run_arm.py run --name d4-mhc-s0 --depth 4 --mhc --data_dir .carry/exp   # foreground
    python scripts/run_arm.py run --tiny --mhc --data_dir ../shared/data --arm_root /tmp/arms  # CPU dry run

`start` launches the job in a new session (setsid), so it outlives the device call (not the
machine), and returns. `poll` prints every arm's stages and the tail of the current log, waits up to
--wait_s for the job to end, and writes arm_pack.tar.gz (< 16 MiB) and arm_status.json to --out
($OUT). Each stage runs as a child process under its own time limit; no stage starts after
--deadline_s (a machine goes back 30 minutes after it started), and the arm is packed after every
stage, so any poll brings back all that is finished.

Stages, in this order (a baseline arm defaults to the first three):
    train      scripts/base_train.py (one run per --lr_sweep value; the lowest final val bpb is kept)
    eval       evals/run_all.py: val bpb, HellaSwag, ARC-E, ARC-C, GSM8K 0/8-shot
    latency    scripts/infer_bench.py --ckpt: decode ms/token at batch 1 and 64, peak memory
    hres       scripts/arm_tools.py capture-hres: H_res of every sublayer on fixed val rows (mHC only)
    sft        scripts/sft.py: GSM8K fine-tuning            eval_sft  evals/run_all.py on it
    rl:<mode>-<reward>   rl/train_gate_ppo.py on the SFT model (the first run of --rl_runs first)
    eval_rl    arm_tools.py bake-gates (the first RL run's mean gates into a copy of the SFT model),
               then evals/run_all.py on it
After every stage the arm's pack folder gets its small artifacts, arm.json, run.json and the
ledger entry that scripts/arm_tools.py ledger-entry builds from them.
"""

import argparse
import datetime
import glob
import importlib.metadata
import importlib.util
import json
import lzma
import os
import platform
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import time
import traceback
from pathlib import Path

CODE_DIRS = ("nanochat", "evals", "rl", "scripts")
LR_FLAGS = ("matrix_lr", "adamw_matrix_lr", "embedding_lr", "unembedding_lr", "mhc_lr", "scalar_lr")
DEFAULT_LIMITS = dict(train=480, eval=300, hres=120, latency=180, sft=420, eval_sft=300, rl=300, eval_rl=360)
EVAL_TASKS = "bpb,hellaswag,arc_easy,arc_challenge,gsm8k"
PACK_LIMIT_BYTES = 15 * 2**20  # the device returns files of at most 16 MiB
PACK_OPTIONAL = ("logs/", "/plots/", "episodes.jsonl")  # dropped first (largest first) when over the limit
# Tiny CPU dry run: every stage with the smallest sizes that still exercise it (about a minute on 2 cores)
TINY_ARM = dict(depth=2, data="tinyshakespeare", tokenizer="char", max_shards=-1, max_seq_len=64,
                device_batch_size=4, total_batch_size=256, target_tokens=1536, eval_every=3, eval_tokens=1024,
                rl_runs="per_layer-logprob", rl_timesteps=8, rl_eval_limit=4, rl_dev_limit=4, rl_grid="0,1",
                limits="train=240,eval=240,hres=120,latency=120,sft=240,eval_sft=240,rl=240,eval_rl=240",
                device="cpu")
TINY_ARGS = dict(
    eval=["--limit", "4", "--bpb_tokens", "2048", "--bpb_batch_size", "1", "--max_new_tokens", "8",
          "--batch_size", "4"],
    latency=["--modes", "eager", "--mhc_modes", "eager", "--batch_sizes", "1", "--prompt_len", "8",
             "--new_tokens", "4", "--prefill_len", "16", "--prefill_batch", "1", "--repeats", "1", "--threads", "1"],
    sft=["--num_iterations", "2", "--batch_size", "2", "--eval_limit", "2", "--max_new_tokens", "8",
         "--train_limit", "16", "--max_seq_len", "512", "--eval_batch_size", "2"],
    rl=["--rollout_size", "8", "--n_envs", "8", "--batch_size", "8", "--n_epochs", "1", "--max_new_tokens", "4",
        "--train_limit", "16", "--obs_sample_size", "8", "--gen_batch_size", "8"])
GPU_ARGS = dict(
    eval=["--engine_mode", "cuda_graph"],
    latency=["--modes", "cuda_graph", "--mhc_modes", "cuda_graph", "--batch_sizes", "1,64", "--repeats", "3"],
    sft=["--eval_batch_size", "200"], rl=[])


# ----------------------------------------------------------------------------- flags

def arm_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="run_arm.py (arm flags)", add_help=False,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("arm (one line of a --queue file takes the same flags)")
    g.add_argument("--name", default=None,
                   help="arm id, unique in the ledger (default d<depth>-<group>-s<seed>-<date>)")
    g.add_argument("--group", default=None, help="report column: baseline, mhc, mhc_<preset>, baseline_equal_time")
    g.add_argument("--tiny", action="store_true", help="CPU dry run: tiny model, few steps, tiny stage budgets")
    g.add_argument("--depth", type=int, default=4)
    g.add_argument("--mhc", action="store_true", help="Dynamic mHC (n = 4, the project's defaults)")
    g.add_argument("--mhc_preset", default="default", choices=["default", "prd", "paper"])
    g.add_argument("--fused", action=argparse.BooleanOptionalAction, default=None,
                   help="mHC fused Triton kernels (default: on with CUDA)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--lr_scale", type=float, default=1.0, help="multiplies every learning rate of base_train")
    g.add_argument("--lr_sweep", default="", help="comma-separated lr scales: one run each, the best is kept")
    g.add_argument("--data", default="enwiki")
    g.add_argument("--tokenizer", default="gpt2")
    g.add_argument("--max_shards", type=int, default=4, help="train shards (-1: all)")
    g.add_argument("--target_tokens", type=int, default=160 * 131072)
    g.add_argument("--total_batch_size", type=int, default=131072)
    g.add_argument("--device_batch_size", type=int, default=32)
    g.add_argument("--max_seq_len", type=int, default=2048)
    g.add_argument("--eval_every", type=int, default=20, help="val bpb during training every N steps")
    g.add_argument("--eval_tokens", type=int, default=262144)
    g.add_argument("--stages", default=None, help="comma-separated (default: train,eval,latency; mHC: all)")
    g.add_argument("--eval_tasks", default=EVAL_TASKS)
    g.add_argument("--rl_runs", default="per_layer-logprob,global-logprob,per_layer-exact,global-exact",
                   help="<gate_mode>-<reward> PPO runs; the first is the one eval_rl bakes in")
    g.add_argument("--rl_timesteps", type=int, default=4096)
    g.add_argument("--rl_eval_limit", type=int, default=400, help="GSM8K test problems per policy")
    g.add_argument("--rl_dev_limit", type=int, default=200, help="dev problems of the constant-gate grid")
    g.add_argument("--rl_grid", default="0,0.25,0.5,0.75,1")
    for stage in ("train", "eval", "latency", "sft", "rl"):
        g.add_argument(f"--{stage}_args", default="", help=f"extra flags for the {stage} script (last wins)")
    g.add_argument("--limits", default="", help="stage=seconds,... over " + str(DEFAULT_LIMITS))
    g.add_argument("--device", default="auto", help="auto (cuda when nvidia-smi sees a GPU), cuda or cpu")
    return p


def parse_arm(argv: list[str]) -> dict:
    """One arm's settings from its flags (tiny defaults first, explicit flags win); checked here."""
    parser = arm_parser()
    known, _ = parser.parse_known_args(argv)
    if known.tiny:
        parser.set_defaults(**TINY_ARM)
    args = parser.parse_args(argv)
    arm = vars(args)
    arm["argv"] = list(argv)
    arm["group"] = arm["group"] or ("mhc" + ("" if args.mhc_preset == "default" else f"_{args.mhc_preset}")
                                    if args.mhc else "baseline")
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d%H%M")
    arm["name"] = arm["name"] or f"d{args.depth}-{arm['group']}-s{args.seed}-{stamp}"
    if not all(c.isalnum() or c in "._-" for c in arm["name"]):
        raise ValueError(f"--name {arm['name']!r}: use letters, digits, '.', '_' and '-' only")
    default = "train,eval,hres,latency,sft,eval_sft,rl,eval_rl" if args.mhc else "train,eval,latency"
    arm["stage_list"] = [s.strip() for s in (args.stages or default).split(",") if s.strip()]
    unknown = set(arm["stage_list"]) - {"train", "eval", "hres", "latency", "sft", "eval_sft", "rl", "eval_rl"}
    if unknown:
        raise ValueError(f"--stages: unknown {sorted(unknown)}")
    if not args.mhc and set(arm["stage_list"]) & {"hres", "sft", "eval_sft", "rl", "eval_rl"}:
        raise ValueError("--stages hres, sft, eval_sft, rl, eval_rl need an mHC arm (--mhc)")
    arm["sweep"] = [float(s) for s in args.lr_sweep.split(",") if s.strip()] or [args.lr_scale]
    if any(s <= 0 for s in arm["sweep"]):
        raise ValueError(f"--lr_sweep / --lr_scale must be > 0, got {arm['sweep']}")
    if len(arm["sweep"]) > 1 and args.eval_tokens <= 0:
        raise ValueError("--lr_sweep picks by the final val bpb: it needs --eval_tokens > 0")
    arm["rl_run_list"] = [r.strip() for r in args.rl_runs.split(",") if r.strip()]
    for run in arm["rl_run_list"]:
        mode, _, reward = run.partition("-")
        if mode not in ("global", "per_layer", "per_sublayer") or reward not in ("exact", "logprob", "mixed"):
            raise ValueError(f"--rl_runs {run!r}: write <global|per_layer|per_sublayer>-<exact|logprob|mixed>")
    limits = dict(DEFAULT_LIMITS)
    for item in filter(None, (s.strip() for s in args.limits.split(","))):
        key, _, value = item.partition("=")
        if key not in limits or not value.isdigit():
            raise ValueError(f"--limits {item!r}: write stage=seconds with stage in {sorted(limits)}")
        limits[key] = int(value)
    arm["limit_s"] = limits
    return arm


def load_queue(paths: list, values: dict | None = None) -> list[dict]:
    """Queue files, their arms run in the order given: {"defaults": [flags...], "arms": [[flags...], ...]};
    each arm = its file's defaults + its flags. An upper-case token (LR_MHC) is a placeholder for a value
    an earlier session measured: --set LR_MHC=0.5 (one --set for all the files)."""
    lists = []
    for path in paths:
        spec = json.loads(Path(path).read_text(encoding="utf-8"))
        if not isinstance(spec.get("arms"), list) or not spec["arms"]:
            raise ValueError(f"{path}: needs a non-empty 'arms' list of flag lists (docs/runs/README.md)")
        lists += [list(spec.get("defaults", [])) + list(entry) for entry in spec["arms"]]
    where = ", ".join(map(str, paths))
    values = dict(values or {})
    holders = {t for argv in lists for t in argv if re.fullmatch(r"[A-Z][A-Z0-9_]+", t)}
    if holders - set(values) or set(values) - holders:
        raise ValueError(f"{where}: placeholders {sorted(holders)} need --set NAME=VALUE each (got {sorted(values)}; "
                         f"docs/experiments.md says where each value comes from)")
    arms = [parse_arm([values.get(t, t) for t in argv]) for argv in lists]
    names = [a["name"] for a in arms]
    if len(set(names)) != len(names):
        raise ValueError(f"{where}: arm names repeat: {names}")
    return arms


# ----------------------------------------------------------------------------- data and environment

def required_files(arm: dict) -> list[str]:
    """Files (relative to the data folder; X or X.xz) that the arm's stages read."""
    need = []
    if arm["data"] == "enwiki":
        shards = range(arm["max_shards"]) if arm["max_shards"] > 0 else range(8)
        need += [f"enwiki2015/enwiki2015_train_{k:02d}.txt.xz" for k in shards] + ["enwiki2015/enwiki2015_val.txt.xz"]
    elif arm["data"] == "tinyshakespeare":
        need.append("tinyshakespeare/input.txt")
    if arm["tokenizer"] == "gpt2":
        need.append("tokenizers/gpt2.tiktoken")
    stages, tasks = set(arm["stage_list"]), arm["eval_tasks"]
    if stages & {"eval", "eval_sft", "eval_rl"}:
        need += ["hellaswag/hellaswag_val.jsonl"] if "hellaswag" in tasks else []
        for task, subset in (("arc_easy", "ARC-Easy"), ("arc_challenge", "ARC-Challenge")):
            if task in tasks:
                need += [f"arc/{subset}/{subset}-Test.jsonl", f"arc/{subset}/{subset}-Train.jsonl"]
    if "gsm8k" in tasks or stages & {"sft", "rl"}:
        need += ["gsm8k/train.jsonl", "gsm8k/test.jsonl"]
    return need


def check_data(data_dir: Path, arms: list[dict]):
    missing = sorted({f for arm in arms for f in required_files(arm)
                      if not (data_dir / f).is_file() and not (data_dir / (f + ".xz")).is_file()})
    if missing:
        raise FileNotFoundError(f"--data_dir {data_dir} lacks {missing}; make it with "
                                f"`python scripts/arm_tools.py prepare-carry` (docs/experiments.md)")


def copy_data(src: Path, dst: Path):
    """The carried data into the job's own folder (a later call may replace the carried copy):
    X.xz is unpacked to X, except corpus text (.txt.xz), which is read compressed."""
    for path in sorted(src.rglob("*")):
        if not path.is_file():
            continue
        rel = path.relative_to(src)
        unpack = path.suffix == ".xz" and not path.name.endswith(".txt.xz")
        target = dst / (str(rel)[:-3] if unpack else rel)
        if target.exists():
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(target.name + ".tmp")
        if unpack:
            with lzma.open(path) as fin, open(tmp, "wb") as fout:
                shutil.copyfileobj(fin, fout)
        else:
            shutil.copyfile(path, tmp)
        os.replace(tmp, target)


def snapshot_code(root: Path):
    """The code the job runs, frozen: later device calls re-send the working tree while it runs."""
    repo = Path(__file__).resolve().parents[1]
    code = root / "code"
    if code.exists():
        shutil.rmtree(code)
    for name in CODE_DIRS:
        shutil.copytree(repo / name, code / name, ignore=shutil.ignore_patterns("__pycache__"))


def install_wheels(wheels: Path | None, root: Path) -> Path | None:
    whls = sorted(glob.glob(str(wheels / "*.whl"))) if wheels else []
    if not whls:
        return None
    site = root / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                    "--no-cache-dir", "--upgrade", "--target", str(site), *whls], check=True,
                   env=dict(os.environ, PIP_ROOT_USER_ACTION="ignore"))
    return site


def child_env(root: Path, commit: str, site: Path | None, tiny: bool) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(root / "code")] + ([str(site)] if site else []))
    env.update(NANOCHAT_DATA_DIR=str(root / "data"), NANOCHAT_CACHE_DIR=str(root / "cache"),
               NANOCHAT_OUT_DIR=str(root / "out"), NANOCHAT_COMMIT=commit, PYTHONUNBUFFERED="1",
               # NVLink multicast stays off on shared machines (it can take the GPUs down)
               NCCL_NVLS_ENABLE="0", TORCH_SYMM_MEM_DISABLE_MULTICAST="1", NVSHMEM_DISABLE_NVLS="1")
    if tiny:
        env.setdefault("OMP_NUM_THREADS", "1")  # tiny tensors: threads only spin on a shared CPU
    return env


def current_commit() -> str:
    if os.environ.get("NANOCHAT_COMMIT"):
        return os.environ["NANOCHAT_COMMIT"]
    try:
        from nanochat.common import git_commit
        return git_commit()
    except ImportError:  # a device copy without the package on the path and without history
        return "unknown"


def gpu_name() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    names = [line.strip() for line in out.stdout.splitlines() if line.strip()]
    return names[0] if out.returncode == 0 and names else None


def now_iso() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def write_json(path: Path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)  # a poll never reads half a file


def read_json(path: Path, default=None):
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return default


def pid_alive(pid) -> bool:
    if not pid:
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def tail(path: Path, lines: int) -> str:
    try:
        return "\n".join(Path(path).read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def base_train_lr_defaults(code: Path) -> dict:
    """The learning rates base_train uses when none is given: --lr_scale multiplies these."""
    spec = importlib.util.spec_from_file_location("base_train_defaults", code / "scripts" / "base_train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    defaults = module.build_parser().parse_args([])
    return {f: getattr(defaults, f) for f in LR_FLAGS}


# ----------------------------------------------------------------------------- one arm

def stage_names(arm: dict) -> list[str]:
    chosen, runs = arm["stage_list"], arm["rl_run_list"]
    names = []
    if "train" in chosen:
        names += ["train"] if len(arm["sweep"]) == 1 else [f"train_lr{s:g}" for s in arm["sweep"]]
    names += [s for s in ("eval", "hres", "latency", "sft", "eval_sft") if s in chosen]
    names += [f"rl:{runs[0]}"] if "rl" in chosen and runs else []
    names += ["eval_rl"] if "eval_rl" in chosen else []
    names += [f"rl:{r}" for r in runs[1:]] if "rl" in chosen else []
    return names


class ArmRun:
    """One arm on this machine: its folder, its stages (child processes), its pack and ledger entry."""

    def __init__(self, arm: dict, root: Path, job: dict, status: dict, arm_status: dict):
        self.arm, self.root, self.job, self.status, self.arm_status = arm, root, job, status, arm_status
        self.dir = root / "arms" / arm["name"]
        self.pack_dir = root / "pack" / arm["name"]
        self.code, self.py = root / "code", sys.executable
        self.data_dir = root / "data"
        self.device = job["device"] if arm["device"] == "auto" else arm["device"]
        self.profile = "tiny" if arm["tiny"] else ("gpu" if self.device == "cuda" else "cpu")
        self.fused = arm["fused"] if arm["fused"] is not None else self.device == "cuda"
        self.env = child_env(root, job["commit"], Path(job["site"]) if job.get("site") else None, arm["tiny"])
        self.commands, self.started = {}, time.time()
        self.train_dir, self.chosen_scale = None, None

    # ---- commands
    def extra(self, stage: str) -> list[str]:
        profile = {"tiny": TINY_ARGS, "gpu": GPU_ARGS}.get(self.profile, {})
        return list(profile.get(stage, [])) + shlex.split(self.arm[f"{stage}_args"])

    def train_cmd(self, scale: float, out: Path) -> list[str]:
        a = self.arm
        cmd = [self.py, str(self.code / "scripts/base_train.py"), "--depth", str(a["depth"]), "--seed", str(a["seed"]),
               "--data", a["data"], "--tokenizer", a["tokenizer"], "--max_shards", str(a["max_shards"]),
               "--max_seq_len", str(a["max_seq_len"]), "--device_batch_size", str(a["device_batch_size"]),
               "--total_batch_size", str(a["total_batch_size"]), "--target_tokens", str(a["target_tokens"]),
               "--eval_every", str(a["eval_every"]), "--eval_tokens", str(a["eval_tokens"]), "--sample_every", "-1",
               "--save_every", "0", "--keep_last", "1", "--log_every", "10", "--device", self.device,
               "--data_dir", str(self.data_dir), "--out_dir", str(out), "--overwrite"]
        defaults = base_train_lr_defaults(self.code)
        for flag in LR_FLAGS:
            cmd += [f"--{flag}", f"{defaults[flag] * scale:.6g}"]
        if a["mhc"]:
            cmd += ["--mhc_enabled", "--mhc_preset", a["mhc_preset"]] + (["--mhc_fused_kernels"] if self.fused else [])
        return cmd + shlex.split(a["train_args"])

    def eval_cmd(self, ckpt: Path, out: Path) -> list[str]:
        return [self.py, str(self.code / "evals/run_all.py"), "--ckpt", str(ckpt), "--out_dir", str(out),
                "--device", self.device, "--data_dir", str(self.data_dir), "--tasks", self.arm["eval_tasks"],
                "--bpb_corpus", self.arm["data"]] + self.extra("eval")

    def stage_commands(self, stage: str) -> tuple[list[list[str]] | None, str]:
        """(commands, '') to run the stage, or (None, why it cannot run)."""
        a, d, py, code = self.arm, self.dir, self.py, self.code
        common = ["--device", self.device, "--data_dir", str(self.data_dir)]
        if stage.startswith("train"):
            scale = a["sweep"][0] if stage == "train" else float(stage[len("train_lr"):])
            return [self.train_cmd(scale, d / stage)], ""
        if self.train_dir is None:
            return None, "no trained model"
        sft_ok = (d / "sft" / "best.pt").is_file()
        if stage == "eval":
            return [self.eval_cmd(self.train_dir, d / "eval")], ""
        if stage == "latency":
            return [[py, str(code / "scripts/infer_bench.py"), "--ckpt", str(self.train_dir), "--device", self.device,
                     "--out", str(d / "latency" / "infer_bench.json")] + self.extra("latency")], ""
        if stage == "hres":
            return [[py, str(code / "scripts/arm_tools.py"), "capture-hres", "--ckpt", str(self.train_dir),
                     "--out", str(d / "hres" / "hres.npz"), "--corpus", a["data"]] + common], ""
        if stage == "sft":
            return [[py, str(code / "scripts/sft.py"), "--ckpt", str(self.train_dir), "--out_dir", str(d / "sft"),
                     "--seed", str(a["seed"])] + common + self.extra("sft")], ""
        if not sft_ok:
            return None, "no fine-tuned model"
        if stage == "eval_sft":
            return [self.eval_cmd(d / "sft", d / "eval_sft")], ""
        if stage.startswith("rl:"):
            mode, _, reward = stage[3:].partition("-")
            return [[py, str(code / "rl/train_gate_ppo.py"), "--ckpt", str(d / "sft"), "--gate_mode", mode,
                     "--reward", reward, "--out_dir", str(d / "rl" / stage[3:]), "--total_timesteps",
                     str(a["rl_timesteps"]), "--eval_limit", str(a["rl_eval_limit"]), "--dev_limit",
                     str(a["rl_dev_limit"]), "--grid", a["rl_grid"], "--seed", str(a["seed"]), "--no_progress"]
                    + common + self.extra("rl")], ""
        if stage == "eval_rl":
            report = d / "rl" / a["rl_run_list"][0] / "report.json"
            if not report.is_file():
                return None, f"no report of rl:{a['rl_run_list'][0]}"
            baked = d / "rl_baked" / "model.pt"
            return [[py, str(code / "scripts/arm_tools.py"), "bake-gates", "--ckpt", str(d / "sft"), "--report",
                     str(report), "--out", str(baked)], self.eval_cmd(baked, d / "eval_rl")], ""
        raise ValueError(f"unknown stage {stage!r}")

    # ---- running
    def run_stage(self, stage: str, deadline: float) -> dict:
        key = "rl" if stage.startswith("rl:") else ("train" if stage.startswith("train") else stage)
        log = self.dir / "logs" / (stage.replace(":", "_") + ".log")
        record = dict(name=stage, status="skipped", seconds=0.0, limit_s=self.arm["limit_s"][key], rc=None,
                      log=str(log.relative_to(self.dir)), note="")
        left = deadline - time.time()
        cmds, why = self.stage_commands(stage)
        if cmds is None:
            record["note"] = why
            return record
        self.commands[stage] = [shlex.join(["python3"] + c[1:]).replace(str(self.root), "$ARM_ROOT") for c in cmds]
        if left < 30:
            record["note"] = "job deadline reached"
            return record
        limit = min(record["limit_s"], left)
        record.update(status="running", started=now_iso())
        self.arm_status["current"] = stage
        write_json(self.root / "status.json", self.status)
        record.update(run_commands(cmds, log, limit, self.env, cwd=self.dir))
        if record["status"] == "timeout" and limit < record["limit_s"]:
            record["note"] = "stopped at the job deadline"
        return record

    def choose_train_dir(self):
        """The training run whose final val bpb is lowest (a single run: that run) with a checkpoint."""
        runs = []
        for stage in stage_names(self.arm):
            if stage.startswith("train") and (self.dir / stage / "final.pt").is_file():
                summary = read_json(self.dir / stage / "summary.json", {})
                bpb = summary.get("val_bpb")
                scale = self.arm["sweep"][0] if stage == "train" else float(stage[len("train_lr"):])
                runs.append((bpb if bpb is not None else float("inf"), abs(scale - 1.0), stage, scale))
        if runs:
            _, _, stage, self.chosen_scale = min(runs)
            self.train_dir = self.dir / stage

    def run(self, deadline: float):
        self.dir.mkdir(parents=True, exist_ok=True)
        write_json(self.dir / "arm.json", self.arm)
        self.arm_status["state"] = "running"
        for i, stage in enumerate(stage_names(self.arm)):
            if not stage.startswith("train") and self.train_dir is None:
                self.choose_train_dir()
            record = self.run_stage(stage, deadline)
            self.arm_status["stages"][i] = record
            self.arm_status["current"] = None
            self.pack()
            write_json(self.root / "status.json", self.status)
        self.choose_train_dir()
        self.arm_status["state"] = "done"
        self.arm_status["result"] = self.pack()["status"]

    # ---- pack and ledger entry
    def pack(self) -> dict:
        """Copy the small artifacts to pack/<arm>/, with arm.json, run.json and the ledger entry built
        from them (scripts/arm_tools.py ledger-entry); returns the entry."""
        if self.pack_dir.exists():
            shutil.rmtree(self.pack_dir)
        for pattern in PACK_PATTERNS:
            for src in sorted(self.dir.glob(pattern)):
                dst = self.pack_dir / src.relative_to(self.dir)
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src, dst)
        for log in sorted((self.dir / "logs").glob("*.log")):
            (self.pack_dir / "logs").mkdir(parents=True, exist_ok=True)
            (self.pack_dir / "logs" / log.name).write_text(tail(log, 400) + "\n", encoding="utf-8")
        for episodes in sorted(self.dir.glob("rl/*/test_episodes.jsonl")):
            reduce_episodes(episodes, self.pack_dir / episodes.parent.relative_to(self.dir) / "episodes.jsonl")
        write_json(self.pack_dir / "arm.json", self.arm)
        write_json(self.pack_dir / "run.json", self.run_record())
        # the ledger entry is a function of the pack alone, so it can be rebuilt later from the artifacts
        build = [self.py, str(self.code / "scripts" / "arm_tools.py"), "ledger-entry", "--pack_dir", str(self.pack_dir)]
        out = subprocess.run(build, env=self.env, capture_output=True, text=True)
        if out.returncode:
            raise RuntimeError(f"ledger entry of {self.arm['name']} failed: {out.stderr.strip()[-1500:]}")
        return read_json(self.pack_dir / "ledger_entry.json")

    def run_record(self) -> dict:
        """Everything about the run that is not in an artifact: arm_tools.py ledger-entry reads it."""
        return dict(command=self.job["command"], commit=self.job["commit"], device=self.job["device_name"],
                    torch=self.job["torch"], python=platform.python_version(),
                    started=datetime.datetime.fromtimestamp(self.started, datetime.timezone.utc).isoformat(
                        timespec="seconds"), finished=now_iso(), wall_s=round(time.time() - self.started, 1),
                    planned_stages=stage_names(self.arm),
                    stages=[s for s in self.arm_status["stages"] if "status" in s],
                    stage_commands=self.commands, train_run=self.train_dir.name if self.train_dir else None,
                    lr_scale=self.chosen_scale, fused_kernels=self.fused if self.arm["mhc"] else None,
                    train_tokens_available=train_tokens_available(self.root / "cache", self.arm))


PACK_PATTERNS = ("train*/metrics.jsonl", "train*/summary.json", "eval*/results.json", "eval*/results.md",
                 "latency/infer_bench.json", "hres/hres.npz", "sft/sft_report.json", "rl/*/report.json",
                 "rl/*/report.md", "rl/*/metrics.jsonl", "rl/*/plots/*.png", "rl_baked/baked_gates.json")


def run_commands(cmds, log: Path, limit_s: float, env: dict, cwd: Path) -> dict:
    """Run the commands one after another under one time limit; each in its own process group,
    which is what a timeout stops (the child and whatever it started, nothing else)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    with open(log, "a", encoding="utf-8") as out:
        for cmd in cmds:
            left = limit_s - (time.monotonic() - t0)
            out.write(f"$ {shlex.join(cmd)}\n")
            out.flush()
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd,
                                    start_new_session=True)
            try:
                rc = proc.wait(timeout=max(left, 1))
            except subprocess.TimeoutExpired:
                stop_process_group(proc)
                out.write(f"\n[run_arm] stopped at the stage limit ({limit_s:.0f} s)\n")
                return dict(status="timeout", rc=None, seconds=round(time.monotonic() - t0, 1))
            if rc != 0:
                return dict(status="failed", rc=rc, seconds=round(time.monotonic() - t0, 1))
    return dict(status="ok", rc=0, seconds=round(time.monotonic() - t0, 1))


def stop_process_group(proc):
    for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 15)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def reduce_episodes(src: Path, dst: Path):
    """Per test episode only what the report plots need (the completions stay on the machine)."""
    keep = ("policy", "problem_id", "correct_strict", "correct_flexible", "logprob", "gates", "new_tokens")
    dst.parent.mkdir(parents=True, exist_ok=True)
    with open(src, encoding="utf-8") as fin, open(dst, "w", encoding="utf-8") as fout:
        for line in fin:
            if line.strip():
                e = json.loads(line)
                fout.write(json.dumps({k: e.get(k) for k in keep}) + "\n")


def train_tokens_available(cache: Path, arm: dict) -> int | None:
    """Tokens in the train shards the arm used (from the token cache's metadata)."""
    name = {"gpt2": "gpt2", "char": "char"}.get(arm["tokenizer"])
    folder = cache / "tokens" / f"{arm['data']}-{name}"
    metas = sorted(p for p in folder.glob("*.json") if "train" in p.stem) if name else []
    if arm["max_shards"] > 0:
        metas = metas[:arm["max_shards"]]
    counts = [read_json(p, {}).get("num_tokens") for p in metas]
    return sum(counts) if counts and None not in counts else None


# ----------------------------------------------------------------------------- the job, poll, outputs

def run_job(root: Path):
    job = read_json(root / "job.json")
    job["device_name"] = gpu_name() or "cpu"
    job["device"] = "cuda" if gpu_name() else "cpu"
    try:
        job["torch"] = importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        job["torch"] = None
    status = dict(state="running", pid=os.getpid(), started=now_iso(), deadline_s=job["deadline_s"],
                  device=job["device_name"], arms=[dict(arm_id=a["name"], state="pending", current=None,
                                                        stages=[{"name": s} for s in stage_names(a)])
                                                   for a in job["arms"]])
    write_json(root / "status.json", status)
    deadline = job["started_unix"] + job["deadline_s"]
    for arm, arm_status in zip(job["arms"], status["arms"]):
        try:
            ArmRun(arm, root, job, status, arm_status).run(deadline)
        except Exception:  # one broken arm must not cost the others their turn
            arm_status.update(state="error", error=traceback.format_exc()[-2000:])
            print(traceback.format_exc(), flush=True)
        write_json(root / "status.json", status)
    status.update(state="done", finished=now_iso())
    write_json(root / "status.json", status)


def job_running(status, root: Path) -> bool:
    pid = (status or {}).get("pid") or read_json(root / "job.pid")
    return bool(status) and status.get("state") in ("starting", "running") and pid_alive(pid)


def describe(status: dict, root: Path, log_lines: int = 6) -> str:
    if not status:
        return f"no job under {root} (start one: python3 scripts/run_arm.py start ...)"
    elapsed = time.time() - datetime.datetime.fromisoformat(status["started"]).timestamp()
    state = status["state"]
    if state != "done" and not job_running(status, root):
        state += " (process gone)"
    lines = [f"job {state} on {status.get('device')}: {elapsed:.0f} s since start, deadline {status['deadline_s']} s"]
    for arm in status["arms"]:
        lines.append(f"  {arm['arm_id']}: {arm['state']}" + (f" ({arm['result']})" if arm.get("result") else ""))
        for s in arm["stages"]:
            if "status" not in s:
                lines.append(f"    {s['name']:<24} pending")
                continue
            note = f"  [{s['note']}]" if s.get("note") else ""
            shown = "running" if arm.get("current") == s["name"] else s["status"]
            lines.append(f"    {s['name']:<24} {shown:<8} {s['seconds']:>7.1f} s / {s['limit_s']} s{note}")
        if arm.get("error"):
            lines.append("    error: " + arm["error"].strip().splitlines()[-1])
        if arm.get("current"):
            log = root / "arms" / arm["arm_id"] / "logs" / (arm["current"].replace(":", "_") + ".log")
            lines += ["    | " + line[-160:] for line in tail(log, log_lines).splitlines()]
    return "\n".join(lines)


def make_tarball(pack: Path, dest: Path, limit: int = PACK_LIMIT_BYTES) -> list[str]:
    """pack/ as one tar.gz under the device's file limit; optional files go first (largest first)
    when it is too big. Returns what was left out."""
    files = sorted(p for p in pack.rglob("*") if p.is_file()) if pack.is_dir() else []
    left_out = []
    while True:
        tmp = dest.with_name(dest.name + ".tmp")
        with tarfile.open(tmp, "w:gz") as tar:
            for f in files:
                tar.add(f, arcname=str(f.relative_to(pack)))
        optional = [f for f in files if any(tag in "/" + str(f.relative_to(pack)) for tag in PACK_OPTIONAL)]
        if tmp.stat().st_size <= limit or not optional:
            os.replace(tmp, dest)
            return left_out
        drop = max(optional, key=lambda f: f.stat().st_size)
        files.remove(drop)
        left_out.append(str(drop.relative_to(pack)))


def write_outputs(root: Path, out: Path, status: dict):
    out.mkdir(parents=True, exist_ok=True)
    left_out = make_tarball(root / "pack", out / "arm_pack.tar.gz")
    entries = [read_json(p) for p in sorted((root / "pack").glob("*/ledger_entry.json"))]
    write_json(out / "arm_status.json", dict(written=now_iso(), status=status, entries=entries,
                                             left_out_of_pack=left_out))
    size = (out / "arm_pack.tar.gz").stat().st_size
    print(f"wrote {out}/arm_pack.tar.gz ({size / 2**20:.2f} MiB, {len(entries)} arm(s)) and arm_status.json"
          + (f"; left out (size limit): {left_out}" if left_out else ""))


def poll(args):
    root = Path(args.arm_root)
    status = read_json(root / "status.json")
    end, last_print = time.monotonic() + args.wait_s, time.monotonic()
    while job_running(status, root) and time.monotonic() < end:
        time.sleep(min(10.0, max(0.1, end - time.monotonic())))
        status = read_json(root / "status.json", status)
        if time.monotonic() - last_print >= 120:  # a heartbeat the device reply's output tail keeps
            print(f"[{now_iso()}] " + describe(status, root, log_lines=0).splitlines()[0], flush=True)
            last_print = time.monotonic()
    print(describe(status, root))
    out = args.out or os.environ.get("OUT")
    if out and status:
        write_outputs(root, Path(out), status)
    return status


def prepare_job(job_args, arms: list[dict], command: str) -> Path:
    """Every check and the data, code and wheels in place before the job starts."""
    root = Path(job_args.arm_root).resolve()
    status = read_json(root / "status.json")
    if job_running(status, root):
        raise ValueError(f"a job is running under {root}; poll it, or use another --arm_root")
    for arm in arms:
        if (root / "arms" / arm["name"]).exists():
            raise ValueError(f"arm {arm['name']!r} already ran under {root}; give it another --name")
    if job_args.data_dir:
        data_dir = Path(job_args.data_dir)
    else:
        try:
            from nanochat.common import resolve_data_dir
        except ImportError:
            raise ValueError("give --data_dir (the nanochat package is not importable here)") from None
        data_dir = resolve_data_dir()
    check_data(data_dir.resolve(), arms)
    root.mkdir(parents=True, exist_ok=True)
    snapshot_code(root)
    copy_data(data_dir.resolve(), root / "data")
    site = install_wheels(Path(job_args.wheels) if job_args.wheels else None, root)
    commit = current_commit()
    if any("rl" in a["stage_list"] for a in arms):
        env = child_env(root, commit, site, False)
        probe = subprocess.run([sys.executable, "-c", "import gymnasium, stable_baselines3"], env=env,
                               capture_output=True, text=True)
        if probe.returncode:
            raise ValueError("the rl stage needs gymnasium and stable-baselines3: carry their wheels and pass "
                             f"--wheels (docs/experiments.md); import failed: {probe.stderr.strip()[-300:]}")
    write_json(root / "job.json", dict(arms=arms, command=command, data_dir=str(data_dir), commit=commit,
                                       deadline_s=job_args.deadline_s, started_unix=time.time(),
                                       started=now_iso(), site=str(site) if site else None))
    write_json(root / "status.json", dict(state="starting", pid=None, started=now_iso(),
                                          deadline_s=job_args.deadline_s, arms=[]))
    return root


def launch(job_args, arm_argv: list[str], command: str, background: bool) -> int:
    if job_args.queue:
        if arm_argv:
            raise ValueError(f"give arm flags in the --queue file, not on the command line: {arm_argv}")
        pairs = [item.partition("=") for item in job_args.set]
        if any(not sep or not name for name, sep, _ in pairs):
            raise ValueError(f"--set {job_args.set}: write NAME=VALUE")
        arms = load_queue(job_args.queue, {name: value for name, _, value in pairs})
    else:
        arms = [parse_arm(arm_argv)]
    root = prepare_job(job_args, arms, command)
    site = read_json(root / "job.json").get("site")
    env = child_env(root, current_commit(), Path(site) if site else None, False)
    cmd = [sys.executable, str(root / "code" / "scripts" / "run_arm.py"), "job", "--arm_root", str(root)]
    with open(root / "job.log", "a", encoding="utf-8") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=root,
                                start_new_session=True)  # setsid: the job outlives this device call
    write_json(root / "job.pid", proc.pid)  # the job writes status.json itself, with its pid
    names = ", ".join(a["name"] for a in arms)
    print(f"job pid {proc.pid} under {root}: {names}")
    if background:
        print("poll it: python3 scripts/run_arm.py poll --wait_s 560" + (f" --arm_root {root}" if
                                                                          job_args.arm_root != default_root() else ""))
        return 0
    rc = proc.wait()
    print(describe(read_json(root / "status.json"), root))
    return rc


# ----------------------------------------------------------------------------- command line

def default_root() -> str:
    return os.environ.get("NANOCHAT_ARM_ROOT", "/tmp/nanochat_arms")


def job_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("job")
    g.add_argument("--queue", nargs="+", default=None, metavar="FILE",
                   help="JSON file(s) of arms to run one after another, in the order given (docs/runs/README.md)")
    g.add_argument("--set", nargs="*", default=[], metavar="NAME=VALUE", help="values of the queue's placeholders")
    g.add_argument("--arm_root", default=default_root(), help="work folder on the machine ($NANOCHAT_ARM_ROOT)")
    g.add_argument("--data_dir", default=None, help="data folder (prepare-carry's output; default: the bundled data)")
    g.add_argument("--wheels", default=".whl", help="folder of .whl files installed for the job if present")
    g.add_argument("--deadline_s", type=int, default=1380, help="no stage starts after this many seconds")
    return p


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    fmt = argparse.ArgumentDefaultsHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=fmt)
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("run", parents=[job_parser(), arm_parser()], formatter_class=fmt,
                   help="run the arm(s) now and wait (a job process like start's)")
    sub.add_parser("start", parents=[job_parser(), arm_parser()], formatter_class=fmt,
                   help="start the arm(s) as a background job (setsid) and return")
    p = sub.add_parser("poll", formatter_class=fmt, help="show progress; pack the artifacts into --out")
    p.add_argument("--arm_root", default=default_root())
    p.add_argument("--wait_s", type=float, default=0, help="wait up to this long for the job to end")
    p.add_argument("--out", default=None, help="where the pack goes (default: $OUT; none: no pack)")
    p = sub.add_parser("job", help="(internal) the job process that start launches")
    p.add_argument("--arm_root", required=True)
    if not argv or argv[0] not in ("run", "start") or "-h" in argv or "--help" in argv:
        args = parser.parse_args(argv)
    else:  # arm flags go through parse_arm (tiny defaults, checks); job flags through job_parser
        job_args, arm_argv = job_parser().parse_known_args(argv[1:])
        try:
            return launch(job_args, arm_argv, shlex.join(["python3", "scripts/run_arm.py"] + argv),
                          background=argv[0] == "start")
        except (ValueError, FileNotFoundError) as e:
            raise SystemExit(f"error: {e}") from None
    if args.cmd == "poll":
        status = poll(args)
        return 0 if status else 1
    return run_job(Path(args.arm_root))


if __name__ == "__main__":
    sys.exit(main())

"""Regenerate docs/results.md (tables) and docs/figures/ (plots) from the run ledger.

    python scripts/make_report.py                                        # docs/runs/ -> docs/results.md
    python scripts/make_report.py --ingest /work/.device/.../arm_pack.tar.gz   # add a device pack first
    python scripts/make_report.py --runs_dir /tmp/runs --out_md /tmp/r.md --fig_dir /tmp/figs

Inputs: docs/runs/ledger/<arm_id>.json (one entry per arm, docs/runs/README.md) and the artifacts
beside it in docs/runs/artifacts/<arm_id>/ (metrics.jsonl, hres.npz, RL reports). --ingest unpacks
a pack written by scripts/run_arm.py poll into those two places.

Honest by construction: every number is read from a ledger entry or an artifact; a missing arm,
metric or figure prints "no data"; nothing is estimated or filled in. A cell is the mean +- sample
sd over the seeds (n given; an arm that repeats a seed is averaged into that seed's one sample, and
the repeats get their own table); one seed shows the eval's own standard error over items instead. Each
column names its arms, and the provenance table gives every arm's command, commit, device and date.
The hand-written block between <!-- discussion --> and <!-- /discussion --> in the old
results.md is kept.
"""

import argparse
import datetime
import json
import math
import os
import shutil
import tarfile
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
REQUIRED_FIELDS = ("schema", "arm_id", "group", "variant", "depth", "mhc_preset", "seed", "lr_scale", "lr_sweep",
                   "data", "target_tokens", "tokens_trained", "passes", "total_batch_size", "device_batch_size",
                   "max_seq_len", "fused_kernels", "command", "arm_args", "stage_commands", "commit", "device",
                   "torch", "python", "date", "finished", "wall_s", "status", "stages", "metrics", "rl", "rl_baked",
                   "artifacts", "notes")
NO_DATA = "no data"
# PRD section 4.1: (row, metric key with {p} = the column's eval prefix, digits, eval-only)
PRD_ROWS = [("val bpb", "{p}.bpb.bpb", 4, False),
            ("GSM8K 0-shot, strict", "{p}.gsm8k_0shot.exact_match_strict", 3, False),
            ("GSM8K 8-shot, strict", "{p}.gsm8k_8shot.exact_match_strict", 3, False),
            ("HellaSwag 0-shot, acc_norm", "{p}.hellaswag_0shot.acc_norm", 3, False),
            ("ARC-Easy 0-shot, acc", "{p}.arc_easy_0shot.acc", 3, False),
            ("ARC-Challenge 0-shot, acc_norm", "{p}.arc_challenge_0shot.acc_norm", 3, False),
            ("decode latency, ms/token, batch 1", "latency.ms_per_token_b1", 3, True),
            ("decode latency, ms/token, batch 64", "latency.ms_per_token_b64", 3, True),
            ("peak memory, inference batch 64, GiB", "latency.peak_mem_gib_b64", 2, True),
            ("peak memory, training run (steps and evals), GiB", "train.peak_mem_gib", 2, True)]
PRD_COLUMNS = [("baseline", "baseline", "eval"), ("dynamic mHC", "mhc", "eval"),
               ("mHC + GSM8K SFT", "mhc", "eval_sft"), ("RL-tuned (SFT + RL mean gates)", "mhc", "eval_rl")]
# two-sided 95% t quantiles, df 1..30 (beyond: the normal 1.96)
T95 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
       2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


# ----------------------------------------------------------------------------- ledger

def read_json(path):
    return json.loads(Path(path).read_text(encoding="utf-8"))


def check_entry(entry, where) -> dict:
    missing = [f for f in REQUIRED_FIELDS if f not in entry] if isinstance(entry, dict) else list(REQUIRED_FIELDS)
    if missing:
        raise ValueError(f"{where}: not a ledger entry, lacks {missing} (docs/runs/README.md gives the format)")
    return entry


def load_ledger(runs_dir: Path) -> list[dict]:
    entries = [check_entry(read_json(p), p) for p in sorted((runs_dir / "ledger").glob("*.json"))]
    for e in entries:
        e["_artifacts"] = runs_dir / "artifacts" / e["arm_id"]
    return entries


def ingest(pack: Path, runs_dir: Path) -> list[str]:
    """Unpack a run_arm.py pack into the ledger. A newer snapshot of the same run (same arm id and
    start date) replaces the older one; the same id from another run is an error."""
    if not pack.is_file():
        raise FileNotFoundError(f"--ingest {pack}: no such file")
    added = []
    with tempfile.TemporaryDirectory() as tmp, tarfile.open(pack, "r:gz") as tar:
        tar.extractall(tmp, filter="data")  # 'data': no absolute paths, links or devices
        for entry_path in sorted(Path(tmp).glob("*/ledger_entry.json")):
            entry = check_entry(read_json(entry_path), f"{pack}:{entry_path.parent.name}")
            arm_id, ledger = entry["arm_id"], runs_dir / "ledger" / f"{entry['arm_id']}.json"
            if ledger.exists():
                old = read_json(ledger)
                if old["date"] != entry["date"]:
                    raise ValueError(f"{arm_id} is in the ledger from another run (started {old['date']}, this one "
                                     f"{entry['date']}); give the new arm another --name")
                if old["finished"] > entry["finished"]:
                    continue  # the ledger holds a later snapshot of this run
            dest = runs_dir / "artifacts" / arm_id
            if dest.exists():
                shutil.rmtree(dest)
            shutil.copytree(entry_path.parent, dest, ignore=shutil.ignore_patterns("ledger_entry.json"))
            ledger.parent.mkdir(parents=True, exist_ok=True)
            ledger.write_text(json.dumps(entry, indent=2) + "\n", encoding="utf-8")
            added.append(arm_id)
    return added


# ----------------------------------------------------------------------------- statistics

def mean_sd(values) -> tuple[float, float | None, int]:
    n = len(values)
    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else None
    return mean, sd, n


def welch_ci(a: list[float], b: list[float]):
    """mean(a) - mean(b) and its 95% Welch interval (df rounded down: conservative); None if n < 2."""
    if len(a) < 2 or len(b) < 2:
        return None
    (ma, sa, na), (mb, sb, nb) = mean_sd(a), mean_sd(b)
    va, vb = sa * sa / na, sb * sb / nb
    se = math.sqrt(va + vb)
    if se == 0:
        return ma - mb, ma - mb, ma - mb
    df = (va + vb) ** 2 / (va * va / (na - 1) + vb * vb / (nb - 1))
    t = T95[int(df) - 1] if int(df) <= len(T95) else 1.96
    return ma - mb, ma - mb - t * se, ma - mb + t * se


def runs_by_seed(entries, key) -> dict:
    """seed -> [(value, metric record), ...] of the entries that have the metric; a seed trained more
    than once (e.g. again to extend a sweep) has several runs."""
    by_seed = {}
    for e in entries:
        m = e["metrics"].get(key)
        if m and m.get("value") is not None and math.isfinite(m["value"]):
            by_seed.setdefault(e["seed"], []).append((float(m["value"]), m))
    return dict(sorted(by_seed.items()))


def seed_means(runs: dict) -> list[tuple[float, dict]]:
    """(value, metric record) per seed: the runs of a repeated seed are one sample, their mean, so n
    counts seeds and the spread is between seeds."""
    return [(sum(v for v, _ in seed_runs) / len(seed_runs), seed_runs[0][1]) for seed_runs in runs.values()]


def values_of(entries, key) -> list[tuple[float, dict]]:
    return seed_means(runs_by_seed(entries, key))


def repeats_note(runs: dict) -> str:
    """ ", seed 0 run twice" for each seed with several runs (averaged into one sample)."""
    return "".join(f", seed {seed} run {'twice' if len(r) == 2 else f'{len(r)} times'}"
                   for seed, r in runs.items() if len(r) > 1)


def cell(entries, key, digits: int) -> str:
    runs = runs_by_seed(entries, key)
    vals = seed_means(runs)
    if not vals:
        return NO_DATA
    if len(vals) == 1:
        v, m = vals[0]
        se = f" ± {m['stderr']:.{digits}f} s.e." if m.get("stderr") else ""
        items = f", {m['n']} items" if m.get("n") and m.get("stderr") is not None else ""
        return f"{v:.{digits}f}{se} (1 seed{items}{repeats_note(runs)})"
    mean, sd, n = mean_sd([v for v, _ in vals])
    return f"{mean:.{digits}f} ± {sd:.{digits}f} (n={n}{repeats_note(runs)})"


def fmt(x, digits=4) -> str:
    if x is None:
        return NO_DATA
    return f"{x:.{digits}f}" if isinstance(x, float) else f"{x:,}" if isinstance(x, int) else str(x)


# ----------------------------------------------------------------------------- tables

def comparison_sets(entries) -> dict:
    """(depth, target tokens) -> entries: arms comparable at equal tokens."""
    sets = {}
    for e in entries:
        if e["group"] in ("baseline", "mhc"):
            sets.setdefault((e["depth"], e["target_tokens"]), []).append(e)
    return dict(sorted(sets.items()))


def prd_tables(entries) -> list[str]:
    sets = comparison_sets(entries)
    if not sets:
        return ["## PRD 4.1 table", "", f"{NO_DATA}: the ledger holds no baseline or mHC arm.", ""]
    lines = []
    for (depth, tokens), group in sets.items():
        lines += [f"## PRD 4.1 table: d{depth}, {tokens:,} training tokens", "",
                  "| metric | " + " | ".join(c[0] for c in PRD_COLUMNS) + " |",
                  "|---" * (len(PRD_COLUMNS) + 1) + "|"]
        for label, key, digits, eval_only in PRD_ROWS:
            row = []
            for _, grp, prefix in PRD_COLUMNS:
                arms = [e for e in group if e["group"] == grp]
                if eval_only and prefix != "eval":
                    row.append("n/a: same network as dynamic mHC" if arms else NO_DATA)
                else:
                    row.append(cell(arms, key.format(p=prefix), digits))
            lines.append(f"| {label} | " + " | ".join(row) + " |")
        lines.append("")
        for title, grp, prefix in PRD_COLUMNS:
            arms = [e["arm_id"] for e in group if e["group"] == grp
                    and any(k.startswith(prefix + ".") for k in e["metrics"])]
            lines.append(f"- {title}: {', '.join(arms) if arms else NO_DATA}")
        lines += ["", "Accuracies are fractions. mean ± sample sd over seeds (n); one seed: ± the eval's standard "
                  "error over items; a seed trained more than once counts once, with the mean of its runs. RL-tuned = the SFT model with the first RL run's mean gates written in "
                  "(scripts/arm_tools.py bake-gates); the per-problem RL policy is in the RL section.", ""]
    return lines


def difference_cells(a: list[float], b: list[float], digits: int) -> tuple[str, str]:
    """mean(a) - mean(b) [95% Welch interval], and whether the interval excludes 0."""
    ci = welch_ci(a, b)
    if ci is None:
        return "needs ≥ 2 seeds per arm", "-"
    reading = "difference measurable" if ci[1] > 0 or ci[2] < 0 else "no difference measurable"
    return f"{ci[0]:+.{digits}f} [{ci[1]:+.{digits}f}, {ci[2]:+.{digits}f}]", reading


def difference_table(entries) -> list[str]:
    lines = ["## Dynamic mHC minus baseline (equal tokens)", "",
             "| depth, tokens | metric | mHC − baseline [95% Welch CI] | n (mHC, baseline) | reading |",
             "|---|---|---|---|---|"]
    rows = 0
    for (depth, tokens), group in comparison_sets(entries).items():
        for label, key, digits, _ in PRD_ROWS[:6]:
            a = [v for v, _ in values_of([e for e in group if e["group"] == "mhc"], key.format(p="eval"))]
            b = [v for v, _ in values_of([e for e in group if e["group"] == "baseline"], key.format(p="eval"))]
            if not a and not b:
                continue
            rows += 1
            diff, reading = difference_cells(a, b, digits)
            lines.append(f"| d{depth}, {tokens:,} | {label} | {diff} | {len(a)}, {len(b)} | {reading} |")
    return lines + ([] if rows else [f"| {NO_DATA} | | | | |"]) + [""]


def variants_table(entries) -> list[str]:
    lines = ["## Every variant: val bpb and training cost", "",
             "| depth | group | tokens | passes | val bpb | train tokens/s | steady train s | arms |",
             "|---|---|---|---|---|---|---|---|"]
    keys = sorted({(e["depth"], e["group"], e["target_tokens"]) for e in entries})
    for depth, grp, tokens in keys:
        arms = [e for e in entries if (e["depth"], e["group"], e["target_tokens"]) == (depth, grp, tokens)]
        passes = sorted({e["passes"] for e in arms if e["passes"] is not None})
        lines.append(f"| d{depth} | {grp} | {tokens:,} | {', '.join(map(str, passes)) or NO_DATA} "
                     f"| {cell(arms, 'eval.bpb.bpb', 4)} | {cell(arms, 'train.tokens_per_s', 0)} "
                     f"| {cell(arms, 'train.steady_seconds', 1)} | {', '.join(e['arm_id'] for e in arms)} |")
    if not keys:
        lines.append(f"| {NO_DATA} | | | | | | | |")
    return lines + ["", "steady train s = the sum of optimizer-step times minus the compile time (evals excluded).",
                    ""]


def equal_time_lines(entries) -> list[str]:
    """Token budgets that give the baseline the mHC arm's steady training time, per depth and device."""
    lines = ["## Equal wall-clock time", "",
             "An equal-time baseline (group `baseline_equal_time`) trains for the tokens that the baseline's measured "
             "speed covers in the mHC arm's steady training time. Budgets from the ledger (same device only):", ""]
    found = False
    for (depth, tokens), group in comparison_sets(entries).items():
        for device in sorted({e["device"] for e in group}):
            base = [v for v, _ in values_of([e for e in group if e["group"] == "baseline" and e["device"] == device],
                                            "train.tokens_per_s")]
            mhc = [e for e in group if e["group"] == "mhc" and e["device"] == device]
            secs = [v for v, _ in values_of(mhc, "train.steady_seconds")]
            if base and secs:
                found = True
                batch = mhc[0]["total_batch_size"]
                budget = round(mean_sd(base)[0] * mean_sd(secs)[0] / batch) * batch
                lines.append(f"- d{depth}, {tokens:,} tokens, {device}: `--target_tokens {budget}` "
                             f"(baseline {mean_sd(base)[0]:,.0f} tok/s × mHC {mean_sd(secs)[0]:.1f} s)")
    return lines + ([] if found else [f"- {NO_DATA}"]) + [""] + equal_time_table(entries)


def equal_time_table(entries) -> list[str]:
    """The answer at equal wall-clock time: each depth's mHC arms against the equal-time baselines trained
    on the same device, with the training seconds each side actually took."""
    rows = []
    for (depth, tokens), group in comparison_sets(entries).items():
        for device in sorted({e["device"] for e in group}):
            mhc = [e for e in group if e["group"] == "mhc" and e["device"] == device]
            eqt = [e for e in entries if e["group"] == "baseline_equal_time" and e["depth"] == depth
                   and e["device"] == device]
            if not mhc or not eqt:
                continue
            a = [v for v, _ in values_of(mhc, "eval.bpb.bpb")]
            b = [v for v, _ in values_of(eqt, "eval.bpb.bpb")]
            diff, reading = difference_cells(a, b, 4)
            eqt_tokens = ", ".join(f"{t:,}" for t in sorted({e["target_tokens"] for e in eqt}))
            rows.append(f"| d{depth} | {device} | {tokens:,} | {cell(mhc, 'train.steady_seconds', 1)} | {eqt_tokens} "
                        f"| {cell(eqt, 'train.steady_seconds', 1)} | {diff} | {len(a)}, {len(b)} | {reading} |")
    if not rows:
        return []
    return ["| depth | device | mHC tokens | mHC steady train s | baseline tokens | baseline steady train s "
            "| val bpb, mHC − equal-time baseline [95% Welch CI] | n (mHC, baseline) | reading |",
            "|---|---|---|---|---|---|---|---|---|"] + rows + [""]


def lr_sweep_table(entries) -> list[str]:
    lines = ["## Learning-rate sweeps (final in-training val bpb)", "", "| arm | lr scale: val bpb (chosen *) |",
             "|---|---|"]
    swept = [e for e in entries if e["lr_sweep"]]
    for e in swept:
        runs = ", ".join(f"{r['lr_scale']:g}: {fmt(r['val_bpb'])}{' *' if r['chosen'] else ''}" for r in e["lr_sweep"])
        lines.append(f"| {e['arm_id']} (d{e['depth']} {e['group']}) | {runs} |")
    return lines + ([] if swept else [f"| {NO_DATA} | |"]) + [""]


def rl_tables(entries) -> list[str]:
    lines = ["## RL gate tuning on GSM8K test (frozen SFT model; paired, same problems)", ""]
    arms = [e for e in entries if e["rl"]]
    if not arms:
        return lines + [f"{NO_DATA}: no arm ran rl/train_gate_ppo.py.", ""]
    ci = lambda d, k: f"{d[k]:.3f} [{d['ci_low']:.3f}, {d['ci_high']:.3f}]"  # noqa: E731
    for e in arms:
        lines += [f"### {e['arm_id']} (d{e['depth']}, seed {e['seed']})", "",
                  "| run | policy | n | strict acc [95% Wilson] | flexible acc | dense reward [95%] |",
                  "|---|---|---|---|---|---|"]
        for run, r in e["rl"].items():
            for name, p in r["policies"].items():
                lines.append(f"| {run} | {name} | {p['n']} | {ci(p['strict'], 'accuracy')} "
                             f"| {ci(p['flexible'], 'accuracy')} | {ci(p['dense'], 'mean')} |")
        lines += ["", "| run | a vs b | strict a−b (a only / b only), McNemar p | dense a−b [95%], sign-test p |",
                  "|---|---|---|---|"]
        for run, r in e["rl"].items():
            for c in r["comparisons"]:
                s, d = c["strict"], c["dense"]
                lines.append(f"| {run} | {c['a']} vs {c['b']} | {s['difference']:+.3f} ({s['a_only']}/{s['b_only']}), "
                             f"p={s['p_value']:.3f} | {d['difference']:+.4f} "
                             f"[{d['ci_low']:+.4f}, {d['ci_high']:+.4f}], "
                             f"p={d['p_value']:.3f} |")
        lines.append("")
    return lines


def repeats_table(entries) -> list[str]:
    """Arms that trained the same configuration and seed again: how far apart their results are (a
    check of run-to-run determinism; the tables above count each seed once)."""
    same = {}
    for e in entries:
        key = (e["depth"], e["group"], e["mhc_preset"], e["seed"], e["lr_scale"], e["target_tokens"], e["device"])
        same.setdefault(key, []).append(e)
    repeated = [(key, arms) for key, arms in same.items() if len(arms) > 1]
    if not repeated:
        return []
    lines = ["## Repeated runs of one seed", "",
             "| depth | group | seed | lr scale | arms | val bpb of each | largest difference |", "|---|---|---|---|---|---|---|"]
    for (depth, grp, _, seed, lr, _, _), arms in sorted(repeated, key=lambda r: str(r[0])):
        bpbs = [e["metrics"].get("eval.bpb.bpb", {}).get("value") for e in arms]
        known = [b for b in bpbs if b is not None]
        spread = fmt(max(known) - min(known), 5) if len(known) > 1 else NO_DATA
        lines.append(f"| d{depth} | {grp} | {seed} | {fmt(lr, 3)} | {', '.join(e['arm_id'] for e in arms)} "
                     f"| {', '.join(fmt(b, 5) for b in bpbs)} | {spread} |")
    return lines + [""]


def provenance_table(entries) -> list[str]:
    lines = ["## Provenance (every arm in the ledger)", "",
             "| arm | group | d | seed | lr scale | tokens | passes | device | commit | date (UTC) | status "
             "| command |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for e in entries:
        lines.append(f"| {e['arm_id']} | {e['group']} | {e['depth']} | {e['seed']} | {fmt(e['lr_scale'], 3)} "
                     f"| {fmt(e['tokens_trained'])} | {fmt(e['passes'], 3)} | {e['device']} | {e['commit']} "
                     f"| {e['date']} | {e['status']} | `{e['command']}` + `{' '.join(e['arm_args'])}` |")
    if not entries:
        lines.append(f"| {NO_DATA} |" + " |" * 11)
    return lines + ["", "Stage commands, limits and times of each arm: docs/runs/ledger/<arm>.json.", ""]


# ----------------------------------------------------------------------------- figures

def pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only
    import matplotlib.pyplot as plt

    return plt


def read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def train_run(e) -> str:
    return next((r["run"] for r in e["lr_sweep"] if r["chosen"]), "train")


def curves(e) -> dict | None:
    """Loss per step, val bpb per eval, against tokens and steady training seconds (compile excluded)."""
    folder = e["_artifacts"] / train_run(e)
    records = read_jsonl(folder / "metrics.jsonl")
    steps = [r for r in records if "loss" in r and "step_s" in r]
    if not steps:
        return None
    compile_s = (e["metrics"].get("train.compile_s") or {}).get("value") or 0.0
    elapsed, total = {0: 0.0}, 0.0
    for r in steps:
        total += r["step_s"]
        elapsed[r["step"]] = max(0.0, total - compile_s)
    evals = [r for r in records if "val_bpb" in r and r["step"] in elapsed]
    batch = e["total_batch_size"]
    return dict(tokens=[r["step"] * batch for r in steps], loss=[r["loss"] for r in steps],
                eval_tokens=[r["step"] * batch for r in evals], eval_bpb=[r["val_bpb"] for r in evals],
                eval_seconds=[elapsed[r["step"]] for r in evals],
                stream_sim=[(r["step"] * batch, r["mhc_stream_sim"]) for r in evals if "mhc_stream_sim" in r])


def ema(values, beta=0.8):
    out, avg = [], None
    for v in values:
        avg = v if avg is None else beta * avg + (1 - beta) * v
        out.append(avg)
    return out


def save(fig, path: Path, tight: bool = True) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if tight:
        fig.tight_layout()
    fig.savefig(path, dpi=110)
    pyplot().close(fig)
    return path


COLORS = {"baseline": "tab:blue", "mhc": "tab:red", "mhc_prd": "tab:purple", "mhc_paper": "tab:brown",
          "baseline_equal_time": "tab:cyan"}


def fig_training(entries, depth, fig_dir) -> dict:
    """loss_d<depth>.png (training loss) and equal_d<depth>.png (val bpb at equal tokens / time)."""
    arms = [(e, c) for e in entries if e["depth"] == depth for c in [curves(e)] if c]
    out = {}
    if not arms:
        return out
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for e, c in arms:
        if e["group"] != "baseline_equal_time":
            ax.plot(c["tokens"], ema(c["loss"]), color=COLORS.get(e["group"], "gray"), lw=1,
                    label=f"{e['group']} s{e['seed']}")
    ax.set(xlabel="training tokens", ylabel="train loss (EMA 0.8)", title=f"d{depth}: training loss")
    ax.legend(fontsize=7)
    out["loss"] = save(fig, fig_dir / f"loss_d{depth}.png")
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for e, c in arms:
        kw = dict(color=COLORS.get(e["group"], "gray"), marker=".", lw=1, label=f"{e['group']} s{e['seed']}")
        ax1.plot(c["eval_tokens"], c["eval_bpb"], **kw)
        ax2.plot(c["eval_seconds"], c["eval_bpb"], **kw)
    ax1.set(xlabel="training tokens", ylabel="val bpb (in-training eval)", title=f"d{depth}: equal tokens")
    ax2.set(xlabel="steady training seconds (compile excluded)", title=f"d{depth}: equal wall-clock")
    ax2.legend(fontsize=7)
    out["equal"] = save(fig, fig_dir / f"equal_d{depth}.png")
    return out


def fig_lr_sweep(entries, fig_dir) -> Path | None:
    swept = [e for e in entries if e["lr_sweep"]]
    if not swept:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for e in swept:
        runs = [r for r in e["lr_sweep"] if r["val_bpb"] is not None]
        ax.plot([r["lr_scale"] for r in runs], [r["val_bpb"] for r in runs], marker="o",
                color=COLORS.get(e["group"], "gray"), label=f"d{e['depth']} {e['group']} s{e['seed']}")
    ax.set_xscale("log", base=2)
    ax.set(xlabel="learning-rate scale (x base_train defaults)", ylabel="final val bpb", title="LR sweeps")
    ax.legend(fontsize=7)
    return save(fig, fig_dir / "lr_sweep.png")


def fig_hres(e, fig_dir) -> dict:
    """hres_mean_<arm>.png (every sublayer, mean over tokens), hres_tokens_<arm>.png, stream_sim_<arm>.png."""
    import numpy as np

    out, path = {}, e["_artifacts"] / "hres" / "hres.npz"
    plt = pyplot()
    if path.is_file():
        with np.load(path, allow_pickle=False) as z:
            mean, toks, labels = z["hres_mean"], z["hres_tokens"], [str(s) for s in z["slot_labels"]]
            pos, text = z["token_positions"], [str(t) for t in z["token_text"]]
        layers = (len(labels) + 1) // 2
        fig, axes = plt.subplots(layers, 2, figsize=(4, 1.7 * layers + 0.5), squeeze=False)
        for i, ax in enumerate(axes.flat):
            if i < len(labels):
                im = ax.imshow(mean[i], vmin=0, vmax=1, cmap="viridis")
                ax.set_title(f"{labels[i]}, diag {mean[i].diagonal().mean():.3f}", fontsize=7)
            ax.set_xticks([])
            ax.set_yticks([])
        fig.subplots_adjust(right=0.8, hspace=0.4)
        fig.colorbar(im, cax=fig.add_axes([0.85, 0.15, 0.04, 0.7]))
        fig.suptitle(f"{e['arm_id']}: H_res, mean over tokens", fontsize=8)
        out["hres_mean"] = save(fig, fig_dir / f"hres_mean_{e['arm_id']}.png", tight=False)
        fig, axes = plt.subplots(len(pos), len(labels), figsize=(0.9 * len(labels) + 1, 1.0 * len(pos) + 0.8),
                                 squeeze=False)
        for t in range(len(pos)):
            for s in range(len(labels)):
                ax = axes[t, s]
                ax.imshow(toks[t, s], vmin=0, vmax=1, cmap="viridis")
                ax.set_xticks([])
                ax.set_yticks([])
                if t == 0:
                    ax.set_title(labels[s], fontsize=6)
                if s == 0:
                    ax.set_ylabel(f"t={pos[t]} {text[t]!r}"[:18], fontsize=6)
        fig.suptitle(f"{e['arm_id']}: H_res of single tokens (val row 0)", fontsize=8)
        out["hres_tokens"] = save(fig, fig_dir / f"hres_tokens_{e['arm_id']}.png")
    c = curves(e)
    if c and c["stream_sim"]:
        fig, ax = plt.subplots(figsize=(7, 4))
        sims = np.array([s for _, s in c["stream_sim"]])
        for block in range(sims.shape[1]):
            shade = plt.cm.viridis(block / max(1, sims.shape[1] - 1))
            ax.plot([t for t, _ in c["stream_sim"]], sims[:, block], color=shade, label=f"block {block}")
        ax.set(xlabel="training tokens", ylabel="mean pairwise cosine of the streams",
               title=f"{e['arm_id']}: stream similarity (1 = collapsed)")
        ax.legend(fontsize=6, ncol=2)
        out["stream_sim"] = save(fig, fig_dir / f"stream_sim_{e['arm_id']}.png")
    return out


def per_layer(values, layers: int) -> list[float]:
    """Gate values of any slot layout (1, L or 2L) as one value per layer."""
    if len(values) == 1:
        return list(values) * layers
    if len(values) == 2 * layers:
        return [(values[2 * i] + values[2 * i + 1]) / 2 for i in range(layers)]
    return list(values)


def fig_rl(e, fig_dir) -> dict:
    """rl_gates_<arm>.png (gates per layer: learned, RL, best constant) and gate_vs_acc_<arm>_<run>.png."""
    import numpy as np

    plt, out, layers = pyplot(), {}, e["depth"]
    fig, ax = plt.subplots(figsize=(7, 4))
    x = np.arange(layers)
    first = next(iter(e["rl"].values()))
    ax.plot(x, per_layer(first["learned_default_gates"], layers), "ks", label="learned default (mean of sublayers)")
    for k, (run, r) in enumerate(e["rl"].items()):
        p = r["policies"]["rl"]
        ax.errorbar(x + 0.08 * (k + 1), per_layer(p["gate_mean"], layers), yerr=per_layer(p["gate_std"], layers),
                    marker="o", capsize=2, lw=1, label=f"RL {run} (mean ± sd over test problems)")
        ax.axhline(r["best_constant_gate"], ls=":", lw=0.8, color=f"C{k}")
    ax.set(xlabel="layer", ylabel="gate g (0: H_res = I)", ylim=(-0.05, 1.05), title=f"{e['arm_id']}: gates "
           "per layer (dotted: best constant on dev)")
    ax.set_xticks(x)
    ax.legend(fontsize=6)
    out["rl_gates"] = save(fig, fig_dir / f"rl_gates_{e['arm_id']}.png")
    for run, r in e["rl"].items():
        eps = [ep for ep in read_jsonl(e["_artifacts"] / "rl" / run / "episodes.jsonl") if ep["policy"] == "rl"]
        if r["gate_mode"] != "per_layer" or not eps:
            continue
        gates = np.array([ep["gates"] for ep in eps])
        correct = np.array([bool(ep["correct_strict"]) for ep in eps])
        dense = np.array([ep["logprob"] for ep in eps])
        cols = min(4, layers)
        fig, axes = plt.subplots(-(-layers // cols), cols, figsize=(3 * cols, 2.6 * -(-layers // cols)), squeeze=False)
        for i, ax in enumerate(axes.flat):
            if i >= layers:
                ax.axis("off")
                continue
            ax.scatter(gates[~correct, i], dense[~correct], s=6, c="gray", label="wrong")
            ax.scatter(gates[correct, i], dense[correct], s=10, c="tab:green", label="right")
            r_corr = (np.corrcoef(gates[:, i], correct)[0, 1] if gates[:, i].std() > 0 and correct.std() > 0
                      else float("nan"))
            ax.set_title(f"L{i}: acc {correct.mean():.3f}, r(gate, right) {r_corr:.2f}", fontsize=7)
            ax.set_xlabel("gate", fontsize=7)
            ax.set_ylabel("dense reward", fontsize=7)
        axes.flat[0].legend(fontsize=6)
        fig.suptitle(f"{e['arm_id']} {run}: per-layer gate vs accuracy ({len(eps)} test problems)", fontsize=8)
        out[f"gate_vs_acc_{run}"] = save(fig, fig_dir / f"gate_vs_acc_{e['arm_id']}_{run}.png")
    return out


def make_figures(entries, fig_dir: Path) -> list[tuple[str, Path | None]]:
    """(caption, path or None) for every figure the report shows."""
    figs = []
    for depth in sorted({e["depth"] for e in entries}):
        made = fig_training(entries, depth, fig_dir)
        figs += [(f"d{depth}: training loss, baseline vs mHC", made.get("loss")),
                 (f"d{depth}: val bpb at equal tokens and at equal wall-clock time", made.get("equal"))]
    figs.append(("learning-rate sweeps", fig_lr_sweep(entries, fig_dir)))
    shown = {}
    for e in sorted(entries, key=lambda e: e["seed"]):  # the lowest seed of each depth and mHC group
        if e["variant"] == "mhc":
            shown.setdefault((e["depth"], e["group"]), e)
    for e in shown.values():
        made = fig_hres(e, fig_dir)
        figs += [(f"{e['arm_id']}: H_res per sublayer, mean over tokens", made.get("hres_mean")),
                 (f"{e['arm_id']}: H_res of a few single tokens", made.get("hres_tokens")),
                 (f"{e['arm_id']}: stream similarity over training", made.get("stream_sim"))]
    for e in (e for e in entries if e["rl"]):
        made = fig_rl(e, fig_dir)
        figs.append((f"{e['arm_id']}: gate values per layer chosen by RL", made.get("rl_gates")))
        figs += [(f"{e['arm_id']} {k[len('gate_vs_acc_'):]}: per-layer gate vs accuracy", v)
                 for k, v in made.items() if k.startswith("gate_vs_acc_")]
    if not entries:
        figs += [("training loss, baseline vs mHC", None), ("H_res heatmaps", None), ("RL gate values", None)]
    return figs


# ----------------------------------------------------------------------------- results.md

def discussion_block(old_md: Path) -> str:
    start, end = "<!-- discussion -->", "<!-- /discussion -->"
    text = old_md.read_text(encoding="utf-8") if old_md.is_file() else ""
    if start in text and end in text:
        return text[text.index(start): text.index(end) + len(end)]
    return (f"{start}\nWhat the evidence says about each hypothesis goes here, written by hand "
            f"(make_report.py keeps this block).\n{end}")


def write_report(entries, out_md: Path, fig_dir: Path, runs_dir: Path):
    figs = make_figures(entries, fig_dir)
    complete = sum(e["status"] == "complete" for e in entries)
    lines = ["# Results: baseline vs Dynamic mHC vs RL-tuned gates", "",
             f"Generated by `python scripts/make_report.py` on {datetime.date.today()} from {len(entries)} ledger "
             f"entries ({complete} complete) in `{os.path.relpath(runs_dir, out_md.parent)}/ledger/`. Tables and "
             f"figures are rewritten on every run; only the discussion block is kept. The plan: docs/experiments.md.",
             "", discussion_block(out_md), ""]
    lines += prd_tables(entries) + difference_table(entries) + variants_table(entries) + equal_time_lines(entries)
    lines += lr_sweep_table(entries) + repeats_table(entries) + rl_tables(entries) + ["## Figures", ""]
    for caption, path in figs:
        lines += [f"![{caption}]({os.path.relpath(path, out_md.parent)})" if path else f"- {caption}: {NO_DATA}", ""]
    lines += provenance_table(entries)
    out_md.parent.mkdir(parents=True, exist_ok=True)
    out_md.write_text("\n".join(lines), encoding="utf-8")
    return figs


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--runs_dir", default=str(REPO / "docs" / "runs"), help="holds ledger/ and artifacts/")
    p.add_argument("--out_md", default=str(REPO / "docs" / "results.md"))
    p.add_argument("--fig_dir", default=str(REPO / "docs" / "figures"))
    p.add_argument("--ingest", nargs="*", default=[], help="arm_pack.tar.gz files of scripts/run_arm.py poll")
    args = p.parse_args(argv)
    runs_dir = Path(args.runs_dir)
    try:
        for pack in args.ingest:
            print(f"ingested from {pack}: {', '.join(ingest(Path(pack), runs_dir)) or 'nothing new'}")
        entries = load_ledger(runs_dir)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from None
    figs = write_report(entries, Path(args.out_md), Path(args.fig_dir), runs_dir)
    print(f"wrote {args.out_md} ({len(entries)} arms) and {sum(1 for _, f in figs if f)} figures in {args.fig_dir}")


if __name__ == "__main__":
    main()

"""The comparison report of a gate-tuning run: per-policy accuracy and dense reward on GSM8K test,
with 95% confidence intervals and paired tests, as JSON, markdown and plots.

Used by rl/train_gate_ppo.py; also importable to rebuild plots from a saved report.json:

    from rl.report import load_report, plot_policy_accuracy
    plot_policy_accuracy(load_report("out/rl/run/report.json"), "acc.png")

Statistics (every policy is scored on the same test problems, so comparisons are paired):
- accuracy (strict and flexible): Wilson score interval, 95%;
- dense reward (mean teacher-forced log-probability of the gold solution): mean +- 1.96 standard
  errors (the normal approximation; n is the number of test problems, >= 64 in every real run);
- paired accuracy test: exact McNemar test (two-sided binomial test on the discordant pairs);
- paired dense-reward test: exact two-sided sign test on the per-problem differences (no normality
  assumption), plus the mean difference with its 95% normal interval.
Only the standard library and numpy are used, so the report builds where scipy is missing.
"""

import json
import math
from pathlib import Path

import numpy as np

Z95 = 1.959963984540054  # two-sided 95% normal quantile
METRICS = ("strict", "flexible", "dense")  # the per-problem quantities every policy gets
POLICY_FIELDS = ("n", "strict", "flexible", "dense", "reward", "gate_mean", "gate_std")
COMPARISON_FIELDS = ("a", "b", "n", "strict", "flexible", "dense")


# ----------------------------------------------------------------------------- statistics


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion; well behaved at 0 and n (unlike p +- z*se)."""
    if n == 0:
        return (0.0, 1.0)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    # at 0 and n successes the bound is exactly 0 (or 1); computed, it comes out a rounding error
    # inside, above the accuracy itself, which makes a negative error bar
    low = 0.0 if successes == 0 else max(0.0, centre - half)
    high = 1.0 if successes == n else min(1.0, centre + half)
    return (low, high)


def mean_interval(values, z: float = Z95) -> dict:
    """Mean, standard error (n-1 in the variance) and the normal 95% interval."""
    x = np.asarray(values, dtype=np.float64)
    n = len(x)
    if n == 0:
        return {"mean": None, "stderr": None, "ci_low": None, "ci_high": None}
    mean = float(x.mean())
    se = float(x.std(ddof=1) / math.sqrt(n)) if n > 1 else 0.0
    return {"mean": mean, "stderr": se, "ci_low": mean - z * se, "ci_high": mean + z * se}


def binomial_two_sided_p(k: int, n: int) -> float:
    """Exact two-sided p-value of k successes in n fair coin flips (doubling the smaller tail)."""
    if n == 0:
        return 1.0
    k = min(k, n - k)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n
    return min(1.0, 2.0 * tail)


def mcnemar_exact(a_correct, b_correct) -> dict:
    """Exact McNemar test of paired 0/1 outcomes: only problems where a and b disagree count."""
    a = np.asarray(a_correct, dtype=bool)
    b = np.asarray(b_correct, dtype=bool)
    if a.shape != b.shape:
        raise ValueError(f"paired outcomes must have the same length, got {a.shape} and {b.shape}")
    a_only, b_only = int((a & ~b).sum()), int((b & ~a).sum())
    return {"a_only": a_only, "b_only": b_only, "difference": float(a.mean() - b.mean()) if len(a) else 0.0,
            "p_value": binomial_two_sided_p(a_only, a_only + b_only), "test": "exact McNemar"}


def sign_test(a_values, b_values) -> dict:
    """Exact sign test of paired real values, plus the mean difference a - b with its 95% interval."""
    d = np.asarray(a_values, dtype=np.float64) - np.asarray(b_values, dtype=np.float64)
    positive, negative = int((d > 0).sum()), int((d < 0).sum())
    diff = mean_interval(d)
    return {"a_higher": positive, "b_higher": negative, "ties": int(len(d) - positive - negative),
            "difference": diff["mean"], "ci_low": diff["ci_low"], "ci_high": diff["ci_high"],
            "p_value": binomial_two_sided_p(positive, positive + negative), "test": "exact sign test"}


# ----------------------------------------------------------------------------- report


def summarize_policy(episodes: list[dict]) -> dict:
    """Accuracy (strict, flexible) with Wilson intervals, dense reward and reward with normal
    intervals, and the gate values the policy chose (per slot mean and std) for one policy."""
    n = len(episodes)
    out = {"n": n}
    for metric in ("strict", "flexible"):
        k = sum(bool(e[f"correct_{metric}"]) for e in episodes)
        lo, hi = wilson_interval(k, n)
        out[metric] = {"accuracy": k / n if n else None, "correct": k, "ci_low": lo, "ci_high": hi}
    out["dense"] = mean_interval([e["logprob"] for e in episodes])
    out["reward"] = mean_interval([e["reward"] for e in episodes])
    gates = [e["gates"] for e in episodes if e.get("gates") is not None]
    if gates:
        g = np.asarray(gates, dtype=np.float64)
        out["gate_mean"], out["gate_std"] = g.mean(axis=0).tolist(), g.std(axis=0).tolist()
    else:  # the learned default gates: no override, reported separately in the header
        out["gate_mean"], out["gate_std"] = None, None
    return out


def compare_policies(a_name: str, a_episodes: list[dict], b_name: str, b_episodes: list[dict]) -> dict:
    """Paired comparison of two policies scored on the same problems, in the same order."""
    if [e["problem_id"] for e in a_episodes] != [e["problem_id"] for e in b_episodes]:
        raise ValueError(f"policies {a_name!r} and {b_name!r} were not scored on the same problems in the "
                         f"same order; a paired test needs that")
    out = {"a": a_name, "b": b_name, "n": len(a_episodes)}
    for metric in ("strict", "flexible"):
        out[metric] = mcnemar_exact([e[f"correct_{metric}"] for e in a_episodes],
                                    [e[f"correct_{metric}"] for e in b_episodes])
    out["dense"] = sign_test([e["logprob"] for e in a_episodes], [e["logprob"] for e in b_episodes])
    return out


def build_report(policy_episodes: dict[str, list[dict]], comparisons: list[tuple[str, str]],
                 header: dict) -> dict:
    """The whole report: header (run settings), one summary per policy, the paired comparisons."""
    missing = {name for pair in comparisons for name in pair} - set(policy_episodes)
    if missing:
        raise ValueError(f"comparisons name policies that were not evaluated: {sorted(missing)}")
    return {
        **header,
        "policies": {name: summarize_policy(eps) for name, eps in policy_episodes.items()},
        "comparisons": [compare_policies(a, policy_episodes[a], b, policy_episodes[b]) for a, b in comparisons],
    }


def _fmt(x, digits=3):
    return "-" if x is None else f"{x:.{digits}f}"


def report_markdown(report: dict) -> str:
    lines = [f"# Gate tuning report: {report.get('gate_mode')} gates, {report.get('reward')} reward", ""]
    for key in ("checkpoint", "commit", "date", "device", "match", "mixed_weight", "max_new_tokens", "ppo",
                "eval_split", "n_eval", "train_problems",
                "dev_problems", "total_timesteps", "train_seconds", "train_episodes_per_s",
                "eval_episodes_per_s", "best_constant_gate", "learned_default_gates"):
        if key in report:
            value = report[key]
            if isinstance(value, list):
                value = "[" + ", ".join(_fmt(v) for v in value) + "]"
            elif isinstance(value, float):
                value = _fmt(value)
            lines.append(f"- {key}: {value}")
    lines += ["", "## Policies on the test problems (95% intervals)", "",
              "| policy | strict acc | flexible acc | dense reward (mean log-prob) | reward |",
              "|---|---|---|---|---|"]
    for name, p in report["policies"].items():
        s, f, d, r = p["strict"], p["flexible"], p["dense"], p["reward"]
        lines.append(f"| {name} | {_fmt(s['accuracy'])} [{_fmt(s['ci_low'])}, {_fmt(s['ci_high'])}] "
                     f"| {_fmt(f['accuracy'])} [{_fmt(f['ci_low'])}, {_fmt(f['ci_high'])}] "
                     f"| {_fmt(d['mean'], 4)} [{_fmt(d['ci_low'], 4)}, {_fmt(d['ci_high'], 4)}] "
                     f"| {_fmt(r['mean'], 4)} |")
    lines += ["", "## Paired comparisons (a vs b, same problems)", "",
              "| a | b | strict: a-b, a only / b only, p (McNemar) | flexible: a-b, p (McNemar) "
              "| dense: mean a-b [95%], p (sign test) |", "|---|---|---|---|---|"]
    for c in report["comparisons"]:
        s, f, d = c["strict"], c["flexible"], c["dense"]
        lines.append(f"| {c['a']} | {c['b']} | {_fmt(s['difference'])}, {s['a_only']}/{s['b_only']}, "
                     f"p={_fmt(s['p_value'])} | {_fmt(f['difference'])}, p={_fmt(f['p_value'])} "
                     f"| {_fmt(d['difference'], 4)} [{_fmt(d['ci_low'], 4)}, {_fmt(d['ci_high'], 4)}], "
                     f"p={_fmt(d['p_value'])} |")
    if report.get("grid_search"):
        lines += ["", "## Constant-gate grid search on the dev slice (selection only, never test)", "",
                  "| gate | reward | strict acc | dense |", "|---|---|---|---|"]
        for row in report["grid_search"]:
            lines.append(f"| {_fmt(row['gate'], 2)} | {_fmt(row['reward'], 4)} | {_fmt(row['strict'])} "
                         f"| {_fmt(row['dense'], 4)} |")
    if report.get("plots"):
        lines += ["", "## Plots", ""] + [f"- {k}: `{v}`" for k, v in report["plots"].items()]
    return "\n".join(lines) + "\n"


def write_report(report: dict, out_dir) -> tuple[Path, Path]:
    """report.json and report.md in out_dir (refuses to overwrite an earlier report)."""
    out_dir = Path(out_dir)
    json_path, md_path = out_dir / "report.json", out_dir / "report.md"
    if json_path.exists():
        raise FileExistsError(f"{json_path} exists; pick another --out_dir (reports are never overwritten)")
    json_path.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    md_path.write_text(report_markdown(report), encoding="utf-8")
    return json_path, md_path


def load_report(path) -> dict:
    return json.loads(Path(path).read_text(encoding="utf-8"))


# ----------------------------------------------------------------------------- plots


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers
    import matplotlib.pyplot as plt

    return plt


def plot_training_curve(records: list[dict], path) -> Path:
    """Mean reward and accuracy per PPO rollout against environment steps (episodes)."""
    plt = _pyplot()
    steps = [r["step"] for r in records]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, [r["reward_mean"] for r in records], marker="o", label="mean reward")
    ax.set_xlabel("episodes (environment steps)")
    ax.set_ylabel("mean reward per rollout")
    ax2 = ax.twinx()
    ax2.plot(steps, [r["accuracy_strict"] for r in records], color="tab:green", linestyle="--",
             marker=".", label="strict accuracy")
    ax2.set_ylabel("strict accuracy")
    ax2.set_ylim(0, 1)
    lines = ax.get_lines() + ax2.get_lines()
    ax.legend(lines, [line.get_label() for line in lines], loc="best")
    ax.set_title("PPO training on GSM8K train")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def plot_gate_boxplot(gates, slot_labels: list[str], path, title: str = "gates chosen by the RL policy") -> Path:
    """Box plot of the gate values the policy chose per slot (layer or sublayer) over the test problems."""
    plt = _pyplot()
    g = np.asarray(gates, dtype=np.float64)
    fig, ax = plt.subplots(figsize=(max(5, 0.45 * g.shape[1] + 2), 4))
    ax.boxplot([g[:, j] for j in range(g.shape[1])])
    ax.set_xticks(range(1, g.shape[1] + 1), slot_labels, rotation=60 if g.shape[1] > 8 else 0)
    ax.set_ylim(-0.05, 1.05)
    ax.set_ylabel("gate g (0: H_res = I, 1: learned mixing)")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def plot_policy_accuracy(report: dict, path) -> Path:
    """Strict and flexible accuracy per policy with their 95% Wilson intervals."""
    plt = _pyplot()
    names = list(report["policies"])
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(names) + 2), 4))
    for k, metric in enumerate(("strict", "flexible")):
        acc = np.array([report["policies"][n][metric]["accuracy"] for n in names])
        lo = np.array([report["policies"][n][metric]["ci_low"] for n in names])
        hi = np.array([report["policies"][n][metric]["ci_high"] for n in names])
        ax.bar(x + (k - 0.5) * 0.38, acc, width=0.38, yerr=[acc - lo, hi - acc], capsize=3, label=metric)
    top = max(report["policies"][n][m]["ci_high"] for n in names for m in ("strict", "flexible"))
    ax.set_ylim(0, min(1.0, 1.15 * top + 0.02))
    ax.set_xticks(x, names, rotation=20)
    ax.set_ylabel(f"GSM8K {report.get('eval_split', 'test')} accuracy")
    ax.set_title(f"{report.get('n_eval', '')} problems, 95% Wilson intervals".strip())
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)

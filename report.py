"""
The paper's comparison, from run directories or from the results table of a sweep: markdown tables
and, optionally, a figure.

    python report.py --runs='out-study/shakespeare/*' --plot=assets/study_shakespeare.png
    python report.py --results=results/depth.jsonl --plot=assets/gap_depth.png

A run directory is what train.py and eval.py leave in out_dir: ckpt.pt, metrics.jsonl and eval.json.
Runs are grouped into variants: the input code plus every setting that differs between the runs
(code_values, code_scale, or anything else of the training config), so ablations are rows of the same
table. Seeds (seed, code_seed) and bookkeeping (out_dir, eval_interval, device, ...) do not make a
variant: the runs of a variant are its repeats. Per variant the table gives trainable parameters (all,
and in the input), the frozen values the input holds, the number of runs, the held-out loss and
perplexity of eval.json as mean ± sample standard deviation (n - 1) over the runs, the relative gap of
those means to the `learned` variant with the same other settings, and the tokens seen in training.
Two runs of the same settings and seed (a copy, or one run made twice) are flagged, not averaged: the
first given counts, its variant's runs say "+1 DUPLICATE", and a line under the table names both runs
and their losses.

Runs trained or evaluated on different data, or of different model shapes, are refused unless
--allow_mixed=True is given (then what differs becomes part of the variants).

A sweep's results (sweep.py: one JSON row per run) are compared by paired seeds: at each setting of
the grid (say n_layer = 4), a code's run of seed s is set against learned's run of seed s, which
started from the same decoder weights and read the same batches. The table gives, per setting and
code, the mean of those per-seed loss differences with a 95% interval (Student's t over the seeds),
and the figure draws them against the setting (n_layer, or the tokens seen). Grid keys that take one
value per code (a learning rate tuned per code) belong to the code, not to the setting. Every row shows
the model's depth and width; the settings all rows share are said above the table. --where keeps the
rows of chosen seeds or settings. Above the table, a line per results table says which of three holds
for its rows: this checkout's code made them all (their code_hash, see sweep.py); or those of other code
were verified on it (`python sweep.py STUDY --verify=N`, recorded beside the table in STUDY.verify.json:
passed, run on this code_hash, of rows still in the table, with a cell of each of their code versions),
N cells to within the tolerance, on the date given; or neither, with why and the commands that verify or
remake them (rows without a code_hash, made before sweep.py recorded it, count as other code's). A table
that mixes code versions says so.

--fit fits, per dataset and code, the per-seed gap to learned (nats) by least squares against log2 of
the tokens seen, of the width and of the depth (those that vary in the rows), and prints each
coefficient (per doubling) with its 95% interval and what the fit gives at the paper's scale (32
layers, width 1,024, 17B tokens): an extrapolation far outside the data, which holds only if the gap
stays linear in those logs, with the interval of the fitted mean under that assumption.
"""
import ast
import glob
import json
import math
import os
import statistics
import sys
from collections import Counter

import numpy as np

from checkpoint import CheckpointError, build_model, load_checkpoint
from common import UserError, atomic_write, code_hash, plot_figure, run_main
from configurator import parse_config, split_settings
from studies import load_results, load_verification, verification_path
from model import BASELINE_CODE, CODES, code_fields
from training import DEFAULTS as TRAIN_DEFAULTS

SHAPE_KEYS = ("n_layer", "n_head", "n_embd", "block_size", "vocab_size")
# Runs whose losses can be compared: trained and evaluated on the same tokens, with models of one shape.
COMPARABLE_KEYS = ("dataset", "evaluated_on", "encoding", "held_out_tokens", *SHAPE_KEYS)
# Not what a run is, only how it was seeded or run: runs differing in these are repeats of one variant.
REPEAT_KEYS = {"seed", "code_seed", "out_dir", "init_from", "eval_interval", "eval_iters", "log_interval",
               "wandb_log", "wandb_project", "wandb_run_name", "device", "dtype", "compile"}
TUNED_KEYS = ("learning_rate", "min_lr")  # chosen per code, and perhaps per setting: part of the code's run
CODE_KEYS = set(code_fields())  # what a row may differ in from its learned baseline (GPTConfig's code fields)


SETTINGS = {  # key: (default, meaning)
    "runs": ("", "run folders (out_dir of train.py and eval.py), comma-separated; globs are expanded"),
    "results": ("", "instead of runs: sweep.py results tables (.jsonl), comma-separated; compared by paired seeds"),
    "x": ("", "with results: the setting the figure's x axis shows, a grid key or tokens_seen ('': the one "
              "that varies)"),
    "plot": ("", "also write a figure to this .png ('': none): with runs, val loss against tokens; with "
                 "results, the paired gap to learned against the setting"),
    "where": ("", "with results: only the rows whose grid values or train settings match, e.g. 'seed=1,2' or "
                  "'n_embd=128;input_code=fixed_min,learned' (';' between keys, ',' between values)"),
    "fit": (False, "with results: also fit the per-seed gap against log2 tokens, width and depth (least squares, "
                   "95% intervals) and extrapolate it to the paper's scale"),
    "allow_mixed": (False, "True: report runs of different data or model shapes (what differs makes separate rows), "
                           "or results tables scored on different data or splits"),
}
DEFAULTS, MEANINGS = split_settings(SETTINGS)
PAPER_SCALE = {"tokens_seen": 17e9, "n_embd": 1024, "n_layer": 32}  # the paper's 0.5B model and budget


def fail(message):
    raise UserError(message)


def load_run(run_dir):
    """What the report needs of one run: its settings, parameter counts and eval.json."""
    try:
        checkpoint = load_checkpoint(run_dir)
        counts = build_model(checkpoint).param_counts()
    except CheckpointError as e:
        fail(str(e))
    eval_path = os.path.join(run_dir, "eval.json")
    if not os.path.isfile(eval_path):
        fail(f"no eval.json in '{run_dir}': evaluate the run first (python eval.py --out_dir={run_dir})")
    try:
        with open(eval_path) as f:
            result = json.load(f)
        result["loss"]
    except (OSError, ValueError, KeyError, TypeError):
        fail(f"{eval_path} is cut short or not eval.py's JSON: make it again (python eval.py --out_dir={run_dir})")
    if result.get("iter_num") != checkpoint.get("iter_num"):
        fail(f"eval.json in '{run_dir}' is of iter {result.get('iter_num')} but ckpt.pt is at iter "
             f"{checkpoint.get('iter_num')}: evaluate it again (python eval.py --out_dir={run_dir})")
    settings = {**checkpoint["config"], **checkpoint["model_args"], "encoding": checkpoint["meta"].get("encoding"),
                "evaluated_on": result["dataset"], "held_out_tokens": result["tokens"]}
    return {"dir": run_dir, "settings": settings, "counts": counts, "eval": result}


def check_comparable(runs, allow_mixed):
    for key in COMPARABLE_KEYS:
        values = {}
        for run in runs:
            values.setdefault(run["settings"].get(key), run["dir"])
        if len(values) > 1 and not allow_mixed:
            shown = ", ".join(f"{value!r} in {run_dir}" for value, run_dir in list(values.items())[:2])
            fail(f"the runs differ in {key} ({shown}): their losses are not comparable; "
                 f"pass --allow_mixed to report them anyway, as separate rows")


def group_variants(runs):
    """({variant key: runs}, {variant key: [(duplicate, the run it duplicates)]}); the key is the input code and
    the (key, value) pairs that tell runs apart. A run of the settings and seed of one given before it (a
    copy, or the same run made twice) is a duplicate: kept out of its variant, so that a mean is over
    distinct seeds, and flagged in the table."""
    keys = sorted({key for run in runs for key in run["settings"]} - REPEAT_KEYS - {"input_code"})
    differing = [key for key in keys if len({repr(run["settings"].get(key)) for run in runs}) > 1]
    variants, seeds, duplicates = {}, {}, {}
    for run in runs:
        key = (run["settings"]["input_code"], tuple((k, run["settings"].get(k)) for k in differing))
        seed = (key, run["settings"].get("seed"), run["settings"].get("code_seed"))
        if seed in seeds:
            duplicates.setdefault(key, []).append((run, seeds[seed]))
            continue
        seeds[seed] = run
        variants.setdefault(key, []).append(run)
    order = {code: i for i, code in enumerate(CODES)}

    def rank(item):  # the codes in the paper's order; under each, its default settings first
        code, name = item[0][0], label(item[0])
        return order.get(code, len(order)), name != code, name

    return dict(sorted(variants.items(), key=rank)), duplicates


def label(variant):
    """'fixed_min code_values=binary': the input code and its settings that are not train.py's defaults."""
    code, settings = variant
    extra = [f"{k}={v}" for k, v in settings if k not in TRAIN_DEFAULTS or v != TRAIN_DEFAULTS[k]]
    return " ".join([code, *extra])


def mean_std(values, digits):
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def learned_baseline(variant, variants):
    code, settings = variant
    others = tuple((k, v) for k, v in settings if k not in CODE_KEYS)
    for (other_code, other_settings), runs in variants.items():
        if other_code == BASELINE_CODE and tuple((k, v) for k, v in other_settings if k not in CODE_KEYS) == others:
            return runs
    return None


def table(variants, duplicates):
    lines = ["| variant | trainable params | trainable input params | frozen input values | runs "
             "| held-out loss | held-out ppl | loss vs learned | ppl vs learned | tokens seen |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for variant, runs in variants.items():
        counts = runs[0]["counts"]
        losses = [run["eval"]["loss"] for run in runs]
        ppls = [run["eval"]["ppl"] for run in runs]
        baseline = learned_baseline(variant, variants)
        if baseline is None:
            gap_loss = gap_ppl = "n/a"
        else:
            gap_loss = f"{statistics.mean(losses) / statistics.mean(r['eval']['loss'] for r in baseline) - 1:+.1%}"
            gap_ppl = f"{statistics.mean(ppls) / statistics.mean(r['eval']['ppl'] for r in baseline) - 1:+.1%}"
        seen = sorted({run["eval"]["tokens_seen"] for run in runs})
        tokens = f"{seen[0]:,}" if len(seen) == 1 else f"{seen[0]:,} to {seen[-1]:,}"
        extra = len(duplicates.get(variant, []))
        count = f"{len(runs)} (+{extra} DUPLICATE, not averaged)" if extra else f"{len(runs)}"
        lines.append(f"| {label(variant)} | {counts['trainable']:,} | {counts['input_trainable']:,} "
                     f"| {counts['input_fixed_values']:,} | {count} | {mean_std(losses, 4)} | {mean_std(ppls, 3)} "
                     f"| {gap_loss} | {gap_ppl} | {tokens} |")
    return "\n".join(lines)


def summary(runs):
    """One line on what the runs share."""
    shared = {key: runs[0]["settings"].get(key) for key in COMPARABLE_KEYS
              if len({repr(run["settings"].get(key)) for run in runs}) == 1}
    parts = [f"{key} {shared[key]}" for key in ("dataset", "encoding") if key in shared]
    if all(key in shared for key in SHAPE_KEYS):
        parts.append("model: {n_layer} layers, {n_embd} wide, {n_head} heads, block_size {block_size}, "
                     "V = {vocab_size:,}".format(**shared))
    if "held_out_tokens" in shared:
        parts.append(f"held-out loss by eval.py over {shared['held_out_tokens']:,} tokens")
    return "; ".join(parts) or "mixed runs"


def read_curve(run_dir):
    """[(tokens, val_loss)] of train.py's periodic evals, from metrics.jsonl."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        fail(f"no metrics.jsonl in '{run_dir}' (train.py writes it): the plot needs the training curves")
    curve = []
    with open(path) as f:
        for line in f:
            try:
                record = json.loads(line)
            except ValueError:  # a line cut short by a kill
                continue
            if "val_loss" in record:
                curve.append((record["tokens"], record["val_loss"]))
    if not curve:
        fail(f"metrics.jsonl in '{run_dir}' holds no val_loss records: the run has no training curve to plot")
    return sorted(curve)


def save_figure(fig, path):
    try:
        atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100, bbox_inches="tight"))
    except OSError as e:
        fail(f"cannot write {path}: {e.strerror or e}")


def plot(variants, title, path):
    """Val loss against tokens, every run, one colour per variant; the right panel zooms on the end."""
    fig = plot_figure(figsize=(11, 4.2))
    import matplotlib.ticker
    curves = {variant: [read_curve(run["dir"]) for run in runs] for variant, runs in variants.items()}
    last = max(tokens for runs in curves.values() for curve in runs for tokens, _ in curve)
    tail = [loss for runs in curves.values() for curve in runs for tokens, loss in curve if tokens >= last / 2]
    full, zoom = fig.subplots(1, 2)
    for i, (variant, runs) in enumerate(curves.items()):
        colour = f"C{i % 10}"  # matplotlib's default cycle, tab10
        for j, curve in enumerate(runs):
            tokens, losses = zip(*curve)
            full.plot(tokens, losses, color=colour, lw=1, alpha=0.8,
                      label=f"{label(variant)} ({len(runs)} run{'s' if len(runs) > 1 else ''})" if j == 0 else None)
            zoom.plot(tokens, losses, color=colour, lw=0.8, alpha=0.35)
        # the mean over the runs where they were all evaluated: the thick line to compare variants by
        shared = sorted(set.intersection(*(set(dict(curve)) for curve in runs)))
        means = [statistics.mean(dict(curve)[t] for curve in runs) for t in shared]
        zoom.plot(shared, means, color=colour, lw=2.2, marker="o", markersize=3)
    zoom.set_xlim(last / 2, last * 1.01)
    zoom.set_ylim(min(tail) - 0.02, max(tail) + 0.02)
    full.set_ylabel("val loss (nats/token, train.py's eval batches)")
    for ax, name in ((full, "val loss during training"), (zoom, "second half: each run (thin) and their mean (thick)")):
        ax.set_xlabel("tokens trained on")
        ax.xaxis.set_major_formatter(matplotlib.ticker.EngFormatter())
        ax.set_title(name, fontsize=10)
        ax.grid(alpha=0.3)
    full.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    save_figure(fig, path)


# ---------------------------------------------------------------- a sweep's results, paired seeds

# Two-sided 95% quantiles of Student's t by degrees of freedom; between entries, the smaller df's
# (a slightly wider interval), and past 30 the Cornish-Fisher expansion about the normal's 1.96.
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
         12: 2.179, 15: 2.131, 20: 2.086, 25: 2.060, 30: 2.042}
Z_975 = 1.959964


def t_975(df):
    if df <= 30:
        return T_975[max(k for k in T_975 if k <= df)]
    z = Z_975  # within 1e-4 of the exact quantile from df = 30 on
    return (z + (z ** 3 + z) / (4 * df) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * df ** 2)
            + (3 * z ** 7 + 19 * z ** 5 + 17 * z ** 3 - 15 * z) / (384 * df ** 3))


def code_label(cell):
    """'random_wide code_width=64': a results row's input code and the code settings (GPTConfig's code
    fields) its grid cell gives other values than train.py's defaults; the code_seed follows the seed."""
    extra = [f"{k}={cell[k]}" for k in sorted(CODE_KEYS & set(cell) - {"input_code", "code_seed"})
             if cell[k] != TRAIN_DEFAULTS[k]]
    return " ".join([cell["input_code"], *extra])


def setting_keys(rows):
    """The grid keys that make a setting: all but the code's own (input_code and the code fields, but
    code_seed, which pairs a code's runs with learned's when the grid sets it), seed, the keys that
    take one value per code (a per-code learning rate belongs to the code) and those with one value
    in all rows. A learning rate tuned per code and setting (per width, say) belongs to the code too,
    when the other keys tell the cells apart without it; in a learning-rate study it is the setting."""
    keys = sorted({k for row in rows for k in row["cell"]} - (CODE_KEYS - {"code_seed"}) - {"seed"})
    by_code = {}
    for row in rows:
        for k in keys:
            by_code.setdefault(k, {}).setdefault(code_label(row["cell"]), set()).add(json.dumps(row["cell"].get(k)))
    per_code = {k for k, codes in by_code.items() if all(len(v) == 1 for v in codes.values()) and
                len(set.union(*codes.values())) > 1}
    constant = {k for k, codes in by_code.items() if len(set.union(*codes.values())) == 1}  # says nothing
    keys = [k for k in keys if k not in per_code | constant]
    rest = [k for k in keys if k not in TUNED_KEYS]
    cells = [(json.dumps([row["cell"].get(k) for k in rest]), code_label(row["cell"]), row["cell"]["seed"])
             for row in rows]
    return rest if len(set(cells)) == len(cells) else keys


def differing(a, b):
    """Why two rows of one cell are in a table: what sets them apart, as the end of the error saying so."""
    keys = sorted(k for k in {**a.get("config", {}), **b.get("config", {})}
                  if k != "out_dir" and a.get("config", {}).get(k) != b.get("config", {}).get(k))
    keys += ["split"] if a.get("split") != b.get("split") else []
    if not keys and a.get("code_hash") != b.get("code_hash"):
        return (f": the same cell run by two code versions (code_hash {a.get('code_hash')} and {b.get('code_hash')}); "
                f"keep the rows of one (python sweep.py STUDY --rerun=True replaces those of other code than yours)")
    if not keys:
        return ": the same run twice; remove one of the rows"
    return (f", which differ in {', '.join(keys)}, not a grid key: the table also holds rows of an earlier study "
            f"config (sweep.py keeps them); move those out of it, or make {keys[0]} a grid key")


def setting_order(setting):
    """Numbers by value (2 before 16), other values by their text, after the numbers."""
    return [(0, v, "") if isinstance(v, (int, float)) and not isinstance(v, bool) else (1, 0, json.dumps(v))
            for _, v in setting]


def paired_gaps(rows):
    """[(setting, code label, its rows by seed, [(seed, loss, learned's loss of that seed)])], in order:
    the codes in model.CODES's order, each code's variants (code_layout=repeat, ...) after it."""
    keys = setting_keys(rows)
    cells = {}
    for row in rows:
        setting = tuple((k, row["cell"].get(k)) for k in keys)
        seen = cells.setdefault(setting, {}).setdefault(code_label(row["cell"]), {})
        if row["cell"]["seed"] in seen:
            fail(f"two results rows for {row['cell']}{differing(seen[row['cell']['seed']], row)}")
        seen[row["cell"]["seed"]] = row
    order = {code: i for i, code in enumerate(CODES)}
    gaps = []
    for setting in sorted(cells, key=setting_order):
        baseline = cells[setting].get(BASELINE_CODE, {})
        for code in sorted(cells[setting], key=lambda c: (order.get(c.split()[0], len(order)), c)):
            runs = cells[setting][code]
            pairs = [(seed, runs[seed]["loss"], baseline[seed]["loss"]) for seed in sorted(runs) if seed in baseline]
            gaps.append((setting, code, runs, pairs))
    return gaps


def gap_stats(pairs):
    """(mean, 95% half-width or None) of the per-seed differences loss - learned's loss."""
    differences = [loss - base for _, loss, base in pairs]
    if len(differences) < 2:
        return (differences[0] if differences else None), None
    half = t_975(len(differences) - 1) * statistics.stdev(differences) / math.sqrt(len(differences))
    return statistics.mean(differences), half


def setting_label(setting, shared):
    return ", ".join(f"{k}={v}" for k, v in setting or shared) or "(one setting)"


def shared_settings(rows):
    """[(grid key, value)] of the grid keys (not the code's, not seed) that take one value in every row."""
    keys = sorted({k for row in rows for k in row["cell"]} - (CODE_KEYS - {"code_seed"}) - {"seed"})
    return [(k, rows[0]["cell"].get(k)) for k in keys if len({json.dumps(row["cell"].get(k)) for row in rows}) == 1]


def model_values(runs, key):
    return "/".join(map(str, sorted({row["config"].get(key) for row in runs.values()}, key=str)))


def results_table(gaps, shared):
    lines = ["| setting | input code | runs | held-out loss | paired seeds | loss - learned (mean ± 95% CI) "
             "| relative | tokens seen | layers | width |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for setting, code, runs, pairs in gaps:
        losses = [row["loss"] for row in runs.values()]
        mean, half = gap_stats(pairs)
        if code == BASELINE_CODE or mean is None:
            gap = relative = "-" if code == BASELINE_CODE else "n/a (no learned run of its seeds)"
        else:
            gap = f"{mean:+.4f}" + (f" ± {half:.4f}" if half is not None else " (one seed)")
            relative = f"{mean / statistics.mean(base for _, _, base in pairs):+.2%}"
        seen = sorted({row["tokens_seen"] for row in runs.values()})
        tokens = f"{seen[0]:,}" if len(seen) == 1 else f"{seen[0]:,} to {seen[-1]:,}"
        model = f"{model_values(runs, 'n_layer')} | {model_values(runs, 'n_embd')}"
        lines.append(f"| {setting_label(setting, shared)} | {code} | {len(runs)} | {mean_std(losses, 4)} "
                     f"| {len(pairs)} | {gap} | {relative} | {tokens} | {model} |")
    return "\n".join(lines)


def x_of(setting, runs, x):
    if x == "tokens_seen":
        return statistics.mean(row["tokens_seen"] for row in runs.values())
    value = dict(setting).get(x)
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        fail(f"x={x} is not a numeric grid key of these results: use one of {', '.join(k for k, _ in setting)} "
             f"or tokens_seen")
    return value


def line_keys(gaps, x):
    """The settings x does not fix: with depth and tokens both in the grid, x = tokens_seen leaves
    n_layer, and each n_layer is a line of its own (max_iters moves with the tokens: no line of its own)."""
    points = [(x_of(setting, runs, x), dict(setting)) for setting, _, runs, _ in gaps]
    keys = dict.fromkeys(k for _, setting in points for k in setting if k != x)
    varying = [k for k in keys if any(len({json.dumps(s.get(k)) for at, s in points if at == x0}) > 1
                                      for x0 in {at for at, _ in points})]
    for key in sorted(varying, key=lambda k: k == "dataset"):  # a key the others decide (a dataset's steps)
        # names no line of its own; the dataset, tried last, is the one kept of keys that decide each other
        rest, decided = [k for k in varying if k != key], {}
        if all(decided.setdefault(json.dumps([s.get(k) for k in rest]), json.dumps(s.get(key))) ==
               json.dumps(s.get(key)) for _, s in points):
            varying.remove(key)
    return varying


def plot_gaps(gaps, x, title, path):
    """The paired gap to learned (mean and 95% interval over seeds) against the setting, a line per code
    and per value of the settings that x does not fix."""
    others = line_keys(gaps, x)
    lines = {}
    for setting, code, runs, pairs in gaps:
        if code != BASELINE_CODE:
            label = " ".join([code, *(f"{k}={v}" for k, v in setting if k in others)])
            lines.setdefault(label, [])
            if pairs:
                lines[label].append((x_of(setting, runs, x), *gap_stats(pairs)))
    unpaired = [label for label, points in lines.items() if not points]
    if unpaired:
        print(f"note: no {BASELINE_CODE} run of the same seeds for {', '.join(unpaired)}: not drawn", file=sys.stderr)
    lines = {label: sorted(points) for label, points in lines.items() if points}
    if not lines:
        fail(f"nothing to draw: no code has a {BASELINE_CODE} run of its seeds at its setting")
    fig = plot_figure(figsize=(6.5, 4.2))
    ax = fig.subplots()
    for i, (label, points) in enumerate(lines.items()):
        xs, means, halves = zip(*points)
        ax.errorbar(xs, means, yerr=[h or 0 for h in halves], marker="o", capsize=3, label=label,
                    color=f"C{i % 10}")
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xlabel(x)
    ax.set_ylabel(f"held-out loss - {BASELINE_CODE}'s (nats; paired seeds, 95% CI)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2)  # below: off the data
    ax.set_title(title, fontsize=9)
    save_figure(fig, path)


def literal(text):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def where_filter(rows, where):
    """The rows whose grid value (else train setting) of each key of --where is one of its values."""
    for part in filter(None, (p.strip() for p in where.split(";"))):
        key, sep, values = (x.strip() for x in part.partition("="))
        if not (key and sep and values):
            fail(f"--where takes key=value[,value...] separated by ';', e.g. 'seed=1,2;n_embd=128', not {part!r}")
        if not any(key in row["cell"] or key in row.get("config", {}) for row in rows):
            fail(f"--where: no results row has {key}")
        wanted = [literal(v.strip()) for v in values.split(",")]
        rows = [row for row in rows if row["cell"].get(key, row.get("config", {}).get(key)) in wanted]
        if not rows:
            fail(f"--where: no results row has {key} in {', '.join(map(str, wanted))}")
    return rows


def unverified(record, rows, others):
    """None when the table's record of sweep.py --verify vouches on this checkout's code for its rows of the
    code versions others, else why not. rows: all the table's rows (its verified cells must still be there)."""
    if record is None:
        return "no verification of them on it is recorded"
    if record["code_hash"] != code_hash():
        return (f"its last verification ({record.get('date', '')[:10]}) ran on other code "
                f"(code_hash {record['code_hash']})")
    if not record["passed"]:
        return f"its last verification on this code ({record.get('date', '')[:10]}) FAILED"
    in_table = {(row.get("name"), row["loss"]) for row in rows}
    if any((cell["name"], cell["loss"]) not in in_table for cell in record["cells"]):
        return "its last verification is of rows no longer in it (remade or removed since)"
    uncovered = others - {cell["code_hash"] for cell in record["cells"]}
    if uncovered:
        return f"its last verification reran no row of code_hash {', '.join(map(str, uncovered))}"
    return None


def provenance_line(path, shown, rows):
    """Above a table: its rows shown were made by this checkout's code (their code_hash, see sweep.py), or
    those made by other code were verified on it (sweep.py --verify, recorded beside the table), or neither."""
    current, hashes = code_hash(), Counter(row.get("code_hash") for row in shown)
    if set(hashes) == {current}:
        return f"Code of {path}: every row was made by this checkout's code (code_hash {current})."
    counts = ", ".join(f"{n} by {h or 'code not recorded (rows of before sweep.py recorded it)'}"
                       for h, n in hashes.most_common())
    mixed = f"this table MIXES {len(hashes)} code versions ({counts})" if len(hashes) > 1 else counts
    others = set(hashes) - {current}
    record = load_verification(path)
    why_not = unverified(record, rows, others)
    if why_not is None:
        return (f"Code of {path}: {mixed}; {len(record['cells'])} of its cells were rerun on this checkout's code "
                f"(code_hash {current}) on {record['date'][:10]} and matched their rows to within "
                f"{record['tolerance']:g} nats (largest difference {record['largest_difference']:.1e}; "
                f"{verification_path(path)}).")
    return (f"Code of {path}: {mixed}; {sum(hashes[h] for h in others)} of {len(shown)} rows were made by other "
            f"code than this checkout's (code_hash {current}), and {why_not}: python sweep.py STUDY --verify=N "
            f"checks them on this code, --rerun=True remakes them.")


def fit_points(gaps):
    """{(dataset, code): [(log2 tokens, log2 width, log2 depth, per-seed gap)]}."""
    points = {}
    for _, code, runs, pairs in gaps:
        if code == BASELINE_CODE:
            continue
        for seed, loss, base in pairs:
            row = runs[seed]
            point = [math.log2(row["tokens_seen"]), math.log2(row["config"]["n_embd"]),
                     math.log2(row["config"]["n_layer"]), loss - base]
            points.setdefault((row.get("dataset"), code), []).append(point)
    return points


def fit_table(gaps):
    """Least squares of the per-seed gap against the log2 factors that vary, per dataset and code: the
    coefficients with 95% intervals and the fitted mean at PAPER_SCALE (an extrapolation)."""
    names = ("tokens_seen", "n_embd", "n_layer")
    lines = ["| dataset | input code | points | intercept | per doubling of tokens | per doubling of width "
             "| per doubling of depth | at 32 layers x 1024 wide, 17B tokens (EXTRAPOLATION) |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for (dataset, code), points in fit_points(gaps).items():
        data = np.array(points, dtype=np.float64)
        varying = [i for i in range(3) if np.ptp(data[:, i]) > 0]
        X = np.column_stack([np.ones(len(data)), data[:, varying]])
        y, dof = data[:, 3], len(data) - X.shape[1]
        if not varying:
            lines.append(f"| {dataset} | {code} | {len(data)} | no factor varies in these rows: nothing to fit "
                         f"| | | | |")
            continue
        if dof < 1 or np.linalg.matrix_rank(X) < X.shape[1]:
            lines.append(f"| {dataset} | {code} | {len(data)} | too few points or settings for a fit | | | | |")
            continue
        beta, *_ = np.linalg.lstsq(X, y, rcond=None)
        covariance = np.linalg.inv(X.T @ X) * float(np.sum((y - X @ beta) ** 2)) / dof
        t = t_975(dof)
        cells = [f"{b:+.4f} ± {t * math.sqrt(v):.4f}" for b, v in zip(beta, np.diag(covariance))]
        by_factor = dict(zip(varying, cells[1:]))
        shown = [by_factor.get(i, f"not varied ({2 ** data[0, i]:,.0f})") for i in range(3)]
        x0 = np.array([1.0, *(math.log2(PAPER_SCALE[names[i]]) for i in varying)])
        half = t * math.sqrt(float(x0 @ covariance @ x0))
        lines.append(f"| {dataset} | {code} | {len(data)} | {cells[0]} | {' | '.join(shown)} "
                     f"| {float(x0 @ beta):+.4f} ± {half:.4f} |")
    return "\n".join(lines)


def report_results(cfg):
    everything = load_results([p for p in (item.strip() for item in cfg["results"].split(",")) if p])
    rows = where_filter(everything, cfg["where"])
    kinds = sorted({f"{row.get('dataset')} ({row.get('split')})" for row in rows})
    by_design = all("dataset" in row["cell"] for row in rows)  # a study over datasets: each is a setting
    if len(kinds) > 1 and not cfg["allow_mixed"] and not by_design:
        fail(f"these results were scored on different data: {', '.join(kinds[:3])}{' ...' if len(kinds) > 3 else ''}; "
             f"report one study at a time, or pass --allow_mixed=True")
    gaps = paired_gaps(rows)
    varying = [k for k in dict.fromkeys(k for setting, _, _, _ in gaps for k, _ in setting)
               if len({dict(s).get(k) for s, _, _, _ in gaps}) > 1]
    x = cfg["x"] or ("tokens_seen" if {"max_iters"} & set(varying) or not varying else varying[0])
    shared = shared_settings(rows)
    print(f"Paired seeds: each code's run of seed s against {BASELINE_CODE}'s run of seed s; mean ± 95% "
          f"interval (Student's t) of those differences; relative: the mean difference / {BASELINE_CODE}'s "
          f"mean loss." + (f" Every row: {setting_label(shared, [])}." if shared else ""))
    for path in dict.fromkeys(row["table"] for row in rows):
        print(provenance_line(path, [row for row in rows if row["table"] == path],
                              [row for row in everything if row["table"] == path]))
    print()
    print(results_table(gaps, shared))
    if cfg["fit"]:
        print(f"\nFit of the per-seed gap (loss - {BASELINE_CODE}'s, nats) by least squares against log2 of the "
              f"factors that vary, each per-seed gap one point; ± the 95% interval (Student's t). The last column "
              f"is far outside the data: it holds only if the gap stays linear in these logs, and a factor not "
              f"varied here is assumed to have no effect.\n")
        print(fit_table(gaps))
    if cfg["plot"]:
        plot_gaps(gaps, x, f"gap to {BASELINE_CODE} against {x}", cfg["plot"])
        print(f"\nwrote {cfg['plot']}", file=sys.stderr)


# --------------------------------------------------------------------------------------- main

def run_folders(runs):
    """The run folders of --runs, in the order given, each once; globs expanded (sorted)."""
    folders = []
    for pattern in filter(None, (item.strip() for item in runs.split(","))):
        matches = sorted(glob.glob(pattern)) if any(c in pattern for c in "*?[") else [pattern]
        if not matches:
            fail(f"no run folder matches '{pattern}'")
        folders += [os.path.normpath(m) for m in matches]
    if not folders:
        fail("no runs given: pass --runs=DIR[,DIR...] (globs work: --runs='out-study/*') or --results=FILE.jsonl")
    return list(dict.fromkeys(folders))


def main(argv):
    cfg = parse_config(DEFAULTS, argv, MEANINGS, __doc__)
    if cfg["plot"] and not cfg["plot"].endswith(".png"):
        fail(f"plot must name a .png file, got '{cfg['plot']}'")
    if cfg["runs"] and cfg["results"]:
        fail("give runs or results, not both")
    if cfg["results"]:
        return report_results(cfg)
    runs = [load_run(d) for d in run_folders(cfg["runs"])]
    check_comparable(runs, cfg["allow_mixed"])
    variants, duplicates = group_variants(runs)
    print(f"{summary(runs)}. Mean ± sample std (n - 1) over the runs of a variant (one run: no ±); "
          f"vs learned: mean / mean of `learned` - 1.\n")
    print(table(variants, duplicates))
    for duplicate, first in (pair for pairs in duplicates.values() for pair in pairs):
        print(f"\nDUPLICATE: {duplicate['dir']} has the settings and seed of {first['dir']} (a copy, or the same run "
              f"made twice): left out of the means, where the first given counts; its held-out loss "
              f"{duplicate['eval']['loss']:.4f}, the first's {first['eval']['loss']:.4f}.")
    if cfg["plot"]:
        plot(variants, summary(runs), cfg["plot"])
        print(f"\nwrote {cfg['plot']}", file=sys.stderr)


if __name__ == "__main__":
    run_main(main)

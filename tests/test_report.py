"""report.py on real runs made here with train.py and eval.py on Shakespeare bytes."""
import json
import os
import shutil
import statistics
import subprocess
import sys

import pytest
import torch

from checkpoint import load_checkpoint
from conftest import REPO, SHAKESPEARE, run_in_process, run_tool

pytestmark = pytest.mark.xdist_group("report")  # one worker: its module fixtures are made once


def evaluated_copy(run_dir, out_dir):
    """A copy of a session fixture's run (left as it is for the other tests), evaluated by eval.py."""
    shutil.copytree(run_dir, out_dir)
    run_in_process("eval.py", f"--out_dir={out_dir}", "--max_val_tokens=4096", "--device=cpu")
    return str(out_dir)


def train_like(run_dir, out_dir, *overrides):
    """Train with exactly the config of run_dir's checkpoint but for overrides (a seed, a setting), then eval."""
    config_file = f"{out_dir}.py"
    with open(config_file, "w") as f:
        f.writelines(f"{key} = {value!r}\n" for key, value in load_checkpoint(run_dir)["config"].items())
    run_in_process("train.py", config_file, f"--out_dir={out_dir}", *overrides)
    run_in_process("eval.py", f"--out_dir={out_dir}", "--max_val_tokens=4096", "--device=cpu")
    return str(out_dir)


def report(*run_dirs, plot=None, allow_mixed=False):
    args = [f"--runs={','.join(map(str, run_dirs))}", *([f"--plot={plot}"] if plot else []),
            *(["--allow_mixed=True"] if allow_mixed else [])]
    return subprocess.run([sys.executable, "report.py", *args], cwd=REPO, capture_output=True, text=True)


def read(run_dir):
    """The run's eval.json."""
    with open(os.path.join(run_dir, "eval.json")) as f:
        return json.load(f)


def rows(markdown):
    """{first cell: {column: cell}} of the markdown table in report.py's output."""
    lines = [line for line in markdown.splitlines() if line.startswith("|")]
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    table = {}
    for line in lines[2:]:
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        table[cells[0]] = dict(zip(header, cells))
    return table


@pytest.fixture(scope="module")
def runs(trained_checkpoint, tmp_path_factory):
    """Tiny runs of train.py (seed 1337 from the session fixture, and more like them), evaluated by eval.py."""
    root = tmp_path_factory.mktemp("report_runs")
    fixed_min = trained_checkpoint("fixed_min")
    made = {"fixed_min-1337": evaluated_copy(fixed_min, root / "fixed_min-1337"),
            "learned-1337": evaluated_copy(trained_checkpoint("learned"), root / "learned-1337"),
            "fixed_min-2": train_like(fixed_min, root / "fixed_min-2", "--seed=2"),
            "binary-1337": train_like(fixed_min, root / "binary-1337", "--code_values=binary")}
    # the same text split by another seed: a different dataset
    run_in_process("prepare.py", f"--input={SHAKESPEARE}", "--dataset=other_split", "--encoding=bytes", "--seed=1",
        f"--out_root={root}", "--workers=1")
    made["other-split"] = train_like(fixed_min, root / "other-split", f"--dataset={root / 'other_split'}")
    return made


@pytest.fixture(scope="module")
def plotted(runs, tmp_path_factory):
    """(stdout, figure path) of report.py on the four runs of one dataset, with --plot."""
    figure = tmp_path_factory.mktemp("figure") / "curves.png"
    result = report(runs["fixed_min-1337"], runs["fixed_min-2"], runs["learned-1337"], runs["binary-1337"],
                    plot=figure)
    assert result.returncode == 0, result.stderr
    return result.stdout, figure


def trainable(run_dir):
    """Trainable parameters counted from the optimizer's state: one exp_avg per trainable tensor."""
    checkpoint = torch.load(os.path.join(run_dir, "ckpt.pt"), weights_only=True)
    return sum(state["exp_avg"].numel() for state in checkpoint["optimizer"]["state"].values())


def test_one_row_per_variant_with_mean_and_sample_std_over_seeds(runs, plotted):
    table = rows(plotted[0])
    assert list(table) == ["fixed_min", "fixed_min code_values=binary", "learned"]
    assert [table[name]["runs"] for name in table] == ["2", "1", "1"]

    seeds = [read(runs["fixed_min-1337"]), read(runs["fixed_min-2"])]
    losses, ppls = [r["loss"] for r in seeds], [r["ppl"] for r in seeds]
    assert table["fixed_min"]["held-out loss"] == f"{statistics.mean(losses):.4f} ± {statistics.stdev(losses):.4f}"
    assert table["fixed_min"]["held-out ppl"] == f"{statistics.mean(ppls):.3f} ± {statistics.stdev(ppls):.3f}"
    learned = read(runs["learned-1337"])
    assert table["learned"]["held-out loss"] == f"{learned['loss']:.4f}"  # one run: no spread to show
    assert table["fixed_min"]["loss vs learned"] == f"{statistics.mean(losses) / learned['loss'] - 1:+.1%}"
    assert table["fixed_min"]["ppl vs learned"] == f"{statistics.mean(ppls) / learned['ppl'] - 1:+.1%}"
    assert table["learned"]["loss vs learned"] == "+0.0%"
    binary = read(runs["binary-1337"])
    assert table["fixed_min code_values=binary"]["loss vs learned"] == f"{binary['loss'] / learned['loss'] - 1:+.1%}"

    assert table["fixed_min"]["trainable input params"] == "0"
    model_args = load_checkpoint(runs["learned-1337"])["model_args"]
    assert table["learned"]["trainable input params"] == f"{model_args['vocab_size'] * model_args['n_embd']:,}"
    for name, run_dir in (("fixed_min", runs["fixed_min-1337"]), ("learned", runs["learned-1337"])):
        assert table[name]["trainable params"] == f"{trainable(run_dir):,}"
        config = load_checkpoint(run_dir)["config"]
        tokens = config["max_iters"] * config["batch_size"] * config["gradient_accumulation_steps"] \
            * config["block_size"]
        assert table[name]["tokens seen"] == f"{read(run_dir)['tokens_seen']:,}" == f"{tokens:,}"


def test_plot_is_a_png(plotted):
    figure = plotted[1]
    with open(figure, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert os.listdir(figure.parent) == [figure.name]  # written atomically: no temp file left


def test_runs_of_different_datasets_are_refused_unless_allow_mixed(runs):
    mixed = report(runs["fixed_min-1337"], runs["other-split"])
    assert mixed.returncode == 1 and mixed.stdout == ""
    assert len(mixed.stderr.strip().splitlines()) == 1
    assert "differ in dataset" in mixed.stderr and "--allow_mixed" in mixed.stderr

    allowed = report(runs["fixed_min-1337"], runs["other-split"], allow_mixed=True)
    assert allowed.returncode == 0, allowed.stderr
    table = rows(allowed.stdout)
    assert len(table) == 2 and all(name.startswith("fixed_min dataset=") for name in table)
    assert {row["held-out loss"] for row in table.values()} == {
        f"{read(runs['fixed_min-1337'])['loss']:.4f}", f"{read(runs['other-split'])['loss']:.4f}"}


def test_a_run_without_eval_json_or_checkpoint_is_one_clear_error(runs, tmp_path):
    not_evaluated = tmp_path / "not_evaluated"
    shutil.copytree(runs["learned-1337"], not_evaluated)
    os.remove(not_evaluated / "eval.json")
    result = report(runs["fixed_min-1337"], not_evaluated)
    assert result.returncode == 1 and len(result.stderr.strip().splitlines()) == 1
    assert f"python eval.py --out_dir={not_evaluated}" in result.stderr

    empty = tmp_path / "empty"
    empty.mkdir()
    result = report(empty)
    assert result.returncode == 1 and len(result.stderr.strip().splitlines()) == 1
    assert "no checkpoint" in result.stderr and "train" in result.stderr


# ------------------------------------------------------- sweep results: the committed tables, and variants of them

def committed(name):
    with open(os.path.join(REPO, "results", f"{name}.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture
def report_results(tmp_path, monkeypatch):
    """report_results(table, *args): report.py --results on rows written to a file of their own (or on
    committed files named by a str), run in this process as its __main__ block runs it."""
    monkeypatch.chdir(REPO)

    def run(table, *args):
        if not isinstance(table, str):
            path = tmp_path / f"results{len(list(tmp_path.iterdir()))}.jsonl"
            path.write_text("".join(json.dumps(row) + "\n" for row in table))
            table = str(path)
        return run_tool("report", [f"--results={table}", *args])
    return run


def table_lines(result):
    assert result.returncode == 0, result.stderr
    table = [line for line in result.stdout.splitlines() if line.startswith("|")][2:]  # past header and rule
    return [[c.strip() for c in line.strip("|").split("|")] for line in table]


def test_settings_are_in_numeric_order(tmp_path, report_results):
    depth = committed("depth")
    for row in depth:  # as if the deepest were 16 layers: as text, 16 would come before 2
        row["cell"]["n_layer"] = 16 if row["cell"]["n_layer"] == 8 else row["cell"]["n_layer"]
    order = list(dict.fromkeys(line[0] for line in table_lines(report_results(depth))))
    assert order == ["n_layer=1", "n_layer=2", "n_layer=4", "n_layer=16"]


def test_rows_kept_from_before_the_grid_gained_a_key_report_the_value_they_trained_with(tmp_path, report_results):
    depth = committed("depth")
    for row in depth:  # the 1-layer rows of a first study whose base set n_layer=1 and whose grid did not
        if row["cell"]["n_layer"] == 1:
            del row["cell"]["n_layer"]
    assert table_lines(report_results(depth)) == table_lines(report_results("results/depth.jsonl"))


def test_two_rows_of_one_cell_say_what_sets_them_apart(tmp_path, report_results):
    depth = committed("depth")
    changed = json.loads(json.dumps(depth[0]))
    changed["config"]["learning_rate"] = 0.024  # an earlier study's base
    result = report_results(depth + [changed])
    assert result.returncode == 1 and result.stderr.count("\n") == 1
    assert "which differ in learning_rate, not a grid key" in result.stderr
    result = report_results(depth + depth[:1])
    assert "the same run twice" in result.stderr


def test_tables_of_different_data_are_refused_unless_allowed(tmp_path, report_results):
    mixed = "results/depth.jsonl,results/bpe.jsonl"  # bytes and BPE
    result = report_results(mixed)
    assert result.returncode == 1 and "these results were scored on different data" in result.stderr
    assert report_results(mixed, "--allow_mixed=True").returncode == 0


def test_a_figure_without_learned_runs_is_one_line_and_two_varying_settings_are_separate_lines(tmp_path,
                                                                                               report_results):
    result = report_results("results/codes_lr.jsonl", f"--plot={tmp_path / 'none.png'}")  # no learned rows
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "note: no learned run of the same seeds" in result.stderr and "error: nothing to draw" in result.stderr
    import report
    depth, longer = committed("depth"), committed("depth")
    for row in longer:  # the same grid at twice the steps: depth and tokens both vary
        row["cell"]["max_iters"], row["tokens_seen"] = 2 * row["config"]["max_iters"], 2 * row["tokens_seen"]
    gaps = report.paired_gaps(depth + longer)
    assert report.line_keys(gaps, "tokens_seen") == ["n_layer"]  # max_iters moves with the tokens
    assert report.line_keys(gaps, "n_layer") == ["max_iters"]
    assert report.line_keys(report.paired_gaps(depth), "n_layer") == []
    assert report_results(depth + longer, f"--plot={tmp_path / 'two.png'}").returncode == 0
    bpe = committed("bpe")  # the same depths on another dataset, trained for other steps
    for row in bpe:
        row["cell"]["dataset"], row["cell"]["max_iters"] = "study_bpe4096", 300
    assert report.line_keys(report.paired_gaps(depth + bpe), "n_layer") == ["dataset"]  # its steps: no line


@pytest.mark.parametrize("df", [31, 45, 120])
def test_the_t_quantile_past_the_table_covers_95_percent(df):
    import math
    import report
    q = report.t_975(df)
    density = lambda t: math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)
                                 - (df + 1) / 2 * math.log1p(t * t / df)) / math.sqrt(df * math.pi)
    n = 2000  # Simpson's rule on [0, q], even n
    inner = sum((4 if i % 2 else 2) * density(q * i / n) for i in range(1, n))
    assert abs(2 * (density(0) + inner + density(q)) * q / (3 * n) - 0.95) < 1e-5


def test_a_grid_over_code_seed_pairs_each_code_seed_with_learned(tmp_path, report_results):
    """code_seed in the grid (the affine map drawn twice per seed): each draw is a setting of its own."""
    rows = []
    for code_seed in (1, 2):
        for row in committed("depth"):
            row["cell"]["code_seed"] = row["config"]["code_seed"] = code_seed
            row["loss"] += 0.01 * code_seed * (row["cell"]["input_code"] == "affine")
            rows.append(row)
    lines = table_lines(report_results(rows))
    affine = {line[0]: float(line[5].split()[0]) for line in lines if line[1] == "affine"}
    assert len(affine) == 8
    assert affine["code_seed=2, n_layer=4"] - affine["code_seed=1, n_layer=4"] == pytest.approx(0.01)


def test_an_eval_json_cut_short_is_one_line_saying_how_to_remake_it(runs, tmp_path):
    cut = tmp_path / "cut"
    shutil.copytree(runs["learned-1337"], cut)
    text = (cut / "eval.json").read_text()
    (cut / "eval.json").write_text(text[:len(text) // 2])  # cut by hand: eval.py writes it atomically
    result = run_tool("report", [f"--runs={runs['fixed_min-1337']},{cut}"])
    assert result.returncode == 1 and len(result.stderr.strip().splitlines()) == 1
    assert f"{cut / 'eval.json'} is cut short" in result.stderr
    assert f"python eval.py --out_dir={cut}" in result.stderr


def test_two_runs_of_the_same_seed_and_settings_are_flagged_not_averaged(runs, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(runs["fixed_min-1337"], copy)
    evaluated = read(copy)
    (copy / "eval.json").write_text(json.dumps({**evaluated, "loss": evaluated["loss"] + 1}))  # so a mean would show
    given = [runs["fixed_min-1337"], copy, runs["fixed_min-2"], runs["learned-1337"]]
    result = run_tool("report", [f"--runs={','.join(map(str, given))}"])
    assert result.returncode == 0, result.stderr
    table = rows(result.stdout)
    assert table["fixed_min"]["runs"] == "2 (+1 DUPLICATE, not averaged)" and table["learned"]["runs"] == "1"
    losses = [read(runs["fixed_min-1337"])["loss"], read(runs["fixed_min-2"])["loss"]]  # the distinct seeds only
    assert table["fixed_min"]["held-out loss"] == f"{statistics.mean(losses):.4f} ± {statistics.stdev(losses):.4f}"
    flagged = [line for line in result.stdout.splitlines() if line.startswith("DUPLICATE: ")]
    assert flagged == [f"DUPLICATE: {copy} has the settings and seed of {runs['fixed_min-1337']} (a copy, or the same "
                       f"run made twice): left out of the means, where the first given counts; its held-out loss "
                       f"{losses[0] + 1:.4f}, the first's {losses[0]:.4f}."]


def test_a_table_of_one_setting_names_it_and_every_row_has_its_depth_and_width(report_results):
    result = report_results("results/depth.jsonl", "--where=n_layer=4;seed=1,2")
    lines = table_lines(result)
    assert {line[0] for line in lines} == {"learning_rate=0.012, min_lr=0.0012, n_layer=4"}
    assert {(line[-2], line[-1]) for line in lines} == {("4", "64")} and {line[2] for line in lines} == {"2"}
    assert "Every row: learning_rate=0.012, min_lr=0.0012, n_layer=4." in result.stdout


def test_the_fit_of_the_gap_against_depth_and_its_extrapolation(report_results):
    """Against one factor the least-squares line is the textbook one: slope cov(x, y) / var(x)."""
    import math
    import report
    result = report_results("results/depth.jsonl", "--fit=True")
    assert result.returncode == 0, result.stderr
    loss = {(r["cell"]["input_code"], r["cell"]["n_layer"], r["cell"]["seed"]): r["loss"] for r in committed("depth")}
    points = [(math.log2(depth), loss["fixed_min", depth, seed] - loss["learned", depth, seed])
              for depth, seed in {(d, s) for _, d, s in loss}]
    x_mean, y_mean = statistics.mean(x for x, _ in points), statistics.mean(y for _, y in points)
    slope = sum((x - x_mean) * (y - y_mean) for x, y in points) / sum((x - x_mean) ** 2 for x, _ in points)
    intercept = y_mean - slope * x_mean
    line = next(line for line in result.stdout.splitlines() if line.startswith("| study_bytes | fixed_min |"))
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[2] == "12" and cells[3].startswith(f"{intercept:+.4f} ± ")
    assert cells[6].startswith(f"{slope:+.4f} ± ")
    assert cells[4] == "not varied (614,400)" and cells[5] == "not varied (64)"
    assert cells[7].startswith(f"{intercept + slope * math.log2(report.PAPER_SCALE['n_layer']):+.4f} ± ")
    assert "EXTRAPOLATION" in result.stdout


def test_the_rates_a_study_reads_are_those_of_lowest_mean_test_loss(monkeypatch):
    import runpy
    import studies
    monkeypatch.chdir(REPO)  # the study config's paths are the checkout's
    rows, step = committed("lr"), runpy.run_path("config/study_lr.py")
    chosen = studies.chosen_rates(step, [("study_bytes", 64, code) for code in ("fixed_min", "affine", "learned")])
    for code in ("fixed_min", "affine", "learned"):
        by_rate = {}
        for row in rows:
            if row["config"]["input_code"] == code:
                by_rate.setdefault((row["config"]["learning_rate"], row["config"]["min_lr"]), []).append(row["loss"])
        assert chosen["study_bytes", 64, code] == min(by_rate, key=lambda rate: statistics.mean(by_rate[rate]))
    with pytest.raises(studies.UserError, match="config/study_lr.py tries no rate for study_bytes, 128, learned"):
        studies.chosen_rates(step, [("study_bytes", 128, "learned")])


def test_a_rate_tuned_per_code_and_setting_belongs_to_the_code(report_results):
    """As in config/study_width.py: each code at its own rate at each width; the pairs stay by setting."""
    depth = committed("depth")
    for row in depth:
        if row["cell"]["input_code"] == "fixed_min":
            row["cell"]["learning_rate"] = row["config"]["learning_rate"] = 0.001 * row["cell"]["n_layer"]
    lines = table_lines(report_results(depth))
    assert [line[0] for line in lines if line[1] == "fixed_min"] == [f"n_layer={n}" for n in (1, 2, 4, 8)]
    assert all(line[4] == "3" for line in lines)  # every fixed_min run paired with learned's of its seed

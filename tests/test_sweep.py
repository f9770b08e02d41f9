"""sweep.py on a tiny grid end to end: a row per cell, a rerun that retrains nothing, a failing cell that does not
stop the others, SIGTERM, a second sweep of one table, bad study configs; the test split it chooses settings on
(eval.py --split=test); and whether a seed gives every input code the same shared weights (paired seeds)."""
import glob
import json
import math
import os
import re
import signal
import statistics
import subprocess
import sys
import time

import pytest
import torch

import common
import sweep
from common import UserError
from conftest import REPO, run, run_tool, shakespeare_text

pytestmark = pytest.mark.xdist_group("sweep")  # one worker: its module fixtures are made once

TINY_BASE = {"n_layer": 1, "n_head": 2, "n_embd": 32, "block_size": 32, "batch_size": 4,
             "gradient_accumulation_steps": 1, "max_iters": 4, "lr_decay_iters": 4, "warmup_iters": 1,
             "eval_interval": 4, "eval_iters": 1, "log_interval": 2, "compile": False, "device": "cpu"}
CODES_BY_SEEDS = {"input_code": ["fixed_min", "learned"], "seed": [1, 2]}


def write_study(path, dataset, grid, **keys):
    settings = {"base": TINY_BASE, "grid": grid, "dataset": dataset, "results": str(path.parent / "results.jsonl"),
                "runs_dir": str(path.parent / "runs"), "jobs": 2, **keys}
    path.write_text("".join(f"{key} = {value!r}\n" for key, value in settings.items()))
    return str(path)


def run_sweep(study):
    return subprocess.run([sys.executable, "sweep.py", study], cwd=REPO, capture_output=True, text=True)


def rows(root):
    with open(root / "results.jsonl") as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """150K characters of Shakespeare in bytes, with a test split: small splits, so evaluation is quick."""
    root = tmp_path_factory.mktemp("sweep_data")
    (root / "text.txt").write_text(shakespeare_text()[:150_000], encoding="utf-8")
    run("prepare.py", f"--input={root / 'text.txt'}", "--dataset=d", "--encoding=bytes", "--doc_chars=2000",
        "--test_fraction=0.1", f"--out_root={root}", "--workers=1")
    return str(root / "d")


@pytest.fixture(scope="module")
def study(tmp_path_factory, dataset):
    """A study of 2 codes x 2 seeds, run once by sweep.py: (its folder, the sweep's result)."""
    root = tmp_path_factory.mktemp("study")
    result = run_sweep(write_study(root / "study.py", dataset, CODES_BY_SEEDS))
    return root, result


def test_each_cell_is_one_row_of_its_settings_loss_and_provenance(study, dataset):
    root, result = study
    assert result.returncode == 0, result.stderr
    assert "[4/4]" in result.stderr and "0 failed" in result.stderr
    with open(os.path.join(dataset, "meta.json")) as f:
        meta = json.load(f)
    found = rows(root)
    assert sorted((r["cell"]["input_code"], r["cell"]["seed"]) for r in found) == [
        ("fixed_min", 1), ("fixed_min", 2), ("learned", 1), ("learned", 2)]
    for row in found:
        with open(os.path.join(row["out_dir"], "eval.json")) as f:
            assert row["loss"] == json.load(f)["loss"]
        assert math.isfinite(row["loss"]) and row["ppl"] == pytest.approx(math.exp(row["loss"]))
        assert row["split"] == "val" and row["eval_tokens"] == meta["val_tokens"] - 1
        assert (row["iter_num"], row["tokens_seen"]) == (4, 4 * 4 * 32)
        config = row["config"]
        assert config["seed"] == config["code_seed"] == row["cell"]["seed"]  # paired seeds
        assert config["input_code"] == row["cell"]["input_code"] and config["n_embd"] == 32
        assert row["params"]["input_trainable"] == (257 * 32 if config["input_code"] == "learned" else 0)
        assert row["torch"] == torch.__version__ and "commit" in row and row["wall_s"] > 0
        assert os.path.isfile(os.path.join(row["out_dir"], "log.txt"))


def test_report_compares_each_code_with_learned_seed_by_seed(study, tmp_path):
    root, _ = study
    figure = tmp_path / "gap.png"
    result = subprocess.run([sys.executable, "report.py", f"--results={root / 'results.jsonl'}", f"--plot={figure}"],
                            cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    loss = {(r["cell"]["input_code"], r["cell"]["seed"]): r["loss"] for r in rows(root)}
    differences = [loss["fixed_min", s] - loss["learned", s] for s in (1, 2)]
    half = 12.706 * statistics.stdev(differences) / math.sqrt(2)  # Student's t, 1 degree of freedom
    line = next(line for line in result.stdout.splitlines() if "| fixed_min |" in line)
    cells = [cell.strip() for cell in line.strip("|").split("|")]
    assert cells[4] == "2" and cells[5] == f"{statistics.mean(differences):+.4f} ± {half:.4f}"
    assert figure.stat().st_size > 0


def test_a_rerun_skips_finished_cells_and_a_failing_cell_does_not_stop_the_others(study, dataset):
    root, _ = study
    checkpoints = [os.path.join(r["out_dir"], "ckpt.pt") for r in rows(root)]
    before = [os.stat(path).st_mtime_ns for path in checkpoints]
    table = (root / "results.jsonl").read_bytes()
    again = run_sweep(str(root / "study.py"))
    assert again.returncode == 0, again.stderr
    assert "4 finished before (skipped), 0 to run" in again.stderr
    # the same four runs, written as tuple keys, and two more that train.py refuses (n_embd 32, n_head 3)
    grid = {("input_code", "n_head"): [("fixed_min", 2), ("learned", 2), ("fixed_min", 3)], "seed": [1, 2]}
    failing = run_sweep(write_study(root / "study.py", dataset, grid))
    assert failing.returncode == 1
    assert "4 finished before (skipped), 2 to run" in failing.stderr
    assert [os.stat(path).st_mtime_ns for path in checkpoints] == before  # nothing retrained
    assert (root / "results.jsonl").read_bytes() == table
    for seed in (1, 2):
        log = root / "runs" / f"fixed_min-n_head3-seed{seed}" / "log.txt"
        assert f"FAILED fixed_min-n_head3-seed{seed}: train.py exit 1" in failing.stderr
        assert f"(log: {log})" in failing.stderr and "must be a multiple of n_head (3)" in log.read_text()
    assert failing.stderr.splitlines()[-1].startswith("error: 2 of 2 cells failed (logs: ")


def test_sigterm_stops_the_running_cell_and_leaves_the_table_as_it_was(study, dataset):
    root, _ = study
    table = (root / "results.jsonl").read_bytes()
    grid = {"input_code": ["fixed_min", "learned"], "seed": [1, 2, 3]}  # two cells to run: seed 3
    proc = subprocess.Popen([sys.executable, "sweep.py", write_study(root / "more.py", dataset, grid, jobs=1)],
                            cwd=REPO, stderr=subprocess.PIPE, text=True)
    log = root / "runs" / "fixed_min-seed3" / "log.txt"
    for _ in range(6000):  # until the first new cell has started (a bound, so that a broken sweep cannot hang)
        if log.exists() or proc.poll() is not None:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, stderr
    assert stderr.splitlines()[-1].startswith("interrupted (SIGTERM): the running cells were stopped")
    assert (root / "results.jsonl").read_bytes() == table
    assert not (root / "runs" / "learned-seed3").exists()  # launched nothing after the signal


def cell_processes(runs_dir):
    """The pids of the train.py processes writing under runs_dir (from /proc: a zombie's command line is empty)."""
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                command = f.read()
        except OSError:  # gone meanwhile
            continue
        if b"train.py" in command and str(runs_dir).encode() in command:
            pids.append(int(pid))
    return pids


@pytest.mark.skipif(sys.platform != "linux", reason="prctl(PR_SET_PDEATHSIG) is Linux's")
def test_a_sweep_killed_outright_takes_its_running_cells_with_it(tmp_path, dataset):
    """An orphaned train.py would go on writing into the folder that the resumed study clears and reruns."""
    endless = {**TINY_BASE, "max_iters": 10 ** 6, "lr_decay_iters": 10 ** 6, "eval_interval": 10 ** 6}
    one_cell = {"input_code": ["fixed_min"], "seed": [1]}
    proc = subprocess.Popen([sys.executable, "sweep.py", write_study(tmp_path / "study.py", dataset, one_cell,
                                                                     base=endless)],
                            cwd=REPO, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not cell_processes(tmp_path / "runs") and proc.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    assert len(cell_processes(tmp_path / "runs")) == 1
    proc.kill()
    proc.wait()
    deadline = time.time() + 10
    while cell_processes(tmp_path / "runs") and time.time() < deadline:
        time.sleep(0.1)
    orphans = cell_processes(tmp_path / "runs")
    for pid in orphans:  # so that a failure here does not leave them running
        os.kill(pid, signal.SIGKILL)
    assert orphans == []


def test_a_cell_folder_that_is_a_link_is_refused_before_anything_runs(tmp_path, dataset):
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "fixed_min-seed1").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(UserError, match="fixed_min-seed1 is a link, not a cell's folder"):
        sweep.main([write_study(tmp_path / "study.py", dataset, CODES_BY_SEEDS)])
    assert sorted(os.listdir(tmp_path / "runs")) == ["fixed_min-seed1"] and not os.listdir(tmp_path / "elsewhere")


@pytest.mark.parametrize("grid, keys, message", [
    ({"input_code": ["learned"], "seed": [1], "n_layers": [2]}, {},
     "'n_layers' is not a train.py key (did you mean 'n_layer'?)"),
    ({"input_code": ["learned"], "seed": []}, {}, "'seed' needs a non-empty list of values"),
    ({"input_code": ["learned"]}, {}, "grid must hold seed"),
    ({"input_code": ["learned"], "seed": [1, 1]}, {}, "lists a value twice"),
    ({"input_code": ["learned"], "seed": [1], "out_dir": ["x"]}, {}, "out_dir is set by sweep.py"),
    ({"input_code": ["learned"], "seed": [1], ("max_iters", "lr_decay_iters"): [(4,)]}, {}, "must be a tuple of 2"),
    ({"input_code": ["learned"], "seed": ["one"]}, {}, "cell learned-seedone: config key 'seed'"),
    (CODES_BY_SEEDS, {"eval_split": "train"}, "eval_split must be val or test"),
    (CODES_BY_SEEDS, {"jobs": 0}, "jobs must be a whole number of at least 1"),
    (CODES_BY_SEEDS, {"base": "no/such/config.py"}, "base config 'no/such/config.py' not found"),
    (CODES_BY_SEEDS, {"results": "results.csv"}, "results must be a .jsonl file"),
])
def test_a_bad_study_is_one_error_before_anything_is_written(tmp_path, dataset, grid, keys, message):
    with pytest.raises(UserError) as error:
        sweep.main([write_study(tmp_path / "study.py", dataset, grid, **keys)])
    assert message in str(error.value)
    assert sorted(os.listdir(tmp_path)) == ["study.py"]


def test_a_row_written_before_train_py_gained_a_key_still_finishes_its_cell():
    config = dict(sweep.TRAIN_DEFAULTS, input_code="learned", seed=2, out_dir="runs/a")
    older = {key: value for key, value in config.items() if key != "rope_theta"}  # a key it did not have yet
    assert sweep.identity(older, "val") == sweep.identity({**config, "out_dir": "elsewhere"}, "val")
    assert sweep.identity(config, "val") != sweep.identity({**config, "n_layer": 3}, "val")
    assert sweep.identity(config, "val") != sweep.identity(config, "test")


def test_a_second_sweep_of_a_table_is_refused_naming_the_first_and_a_report_of_it_is_not(study, tmp_path, dataset):
    table = str(study[0] / "results.jsonl")
    common.hold_writer(table, f"the results table {table}", "")  # as the first sweep.py holds it
    try:
        with pytest.raises(UserError, match=rf"the results table {re.escape(table)} is being written by .*, pid "
                                            rf"{os.getpid()} on .*; or write another table with --results=NEW.jsonl$"):
            sweep.main([write_study(tmp_path / "study.py", dataset, CODES_BY_SEEDS, results=table)])
        assert run_tool("report", [f"--results={table}"]).returncode == 0  # a reader is never blocked
    finally:
        common.release_writers()
    assert not (tmp_path / "runs").exists() and not os.path.exists(f"{table}.lock")


READS_RATES = {"study_width.py": "width_lr.jsonl", "study_scale.py": "width_lr.jsonl",
               "study_tokens.py": "width_lr.jsonl", "study_gpu_width.py": "gpu_width_lr.jsonl"}


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(REPO, "config", "study_*.py"))))
def test_the_bundled_studies_are_valid(path, capsys, monkeypatch):
    monkeypatch.chdir(REPO)  # their paths are relative to the checkout, as in the README's commands
    rates = READS_RATES.get(os.path.basename(path))
    if rates and not os.path.exists(os.path.join(REPO, "results", rates)):
        with pytest.raises(UserError, match=f"{rates}.*the learning rates are chosen from it"):
            sweep.main([path, "--dry_run=True"])  # the step that chooses them has not run yet
        return
    sweep.main([path, "--dry_run=True"])
    cells = int(capsys.readouterr().err.split(" cells: ")[0])
    assert cells >= 9  # 3 codes x 3 seeds, or x 3 learning rates x 2 seeds


def test_eval_scores_the_test_split_apart_and_a_dataset_without_one_is_refused(study, dataset, tmp_path):
    row = rows(study[0])[0]
    before = open(os.path.join(row["out_dir"], "eval.json")).read()
    run("eval.py", f"--out_dir={row['out_dir']}", "--split=test")
    with open(os.path.join(row["out_dir"], "eval_test.json")) as f:
        result = json.load(f)
    with open(os.path.join(dataset, "meta.json")) as f:
        assert (result["split"], result["tokens"]) == ("test", json.load(f)["test_tokens"] - 1)
    assert result["loss"] != row["loss"] and open(os.path.join(row["out_dir"], "eval.json")).read() == before
    run("prepare.py", f"--input={os.path.join(dataset, '..', 'text.txt')}", "--dataset=plain", "--encoding=bytes",
        f"--out_root={tmp_path}", "--workers=1")
    refused = subprocess.run([sys.executable, "eval.py", f"--out_dir={row['out_dir']}", "--split=test",
                              f"--dataset={tmp_path / 'plain'}"], cwd=REPO, capture_output=True, text=True)
    assert refused.returncode == 1
    assert refused.stderr.startswith(f"error: dataset '{tmp_path / 'plain'}' has no test split")
    assert len(refused.stderr.splitlines()) == 1
    study = write_study(tmp_path / "study.py", str(tmp_path / "plain"), CODES_BY_SEEDS, eval_split="test")
    with pytest.raises(UserError, match="has no test split .* prepare it again with --test_fraction=0.1"):
        sweep.main([study])  # before any cell runs
    assert not (tmp_path / "runs").exists()


def test_a_code_setting_in_the_grid_is_its_own_code_in_the_report_paired_with_learned(study, dataset, tmp_path):
    (tmp_path / "results.jsonl").write_bytes((study[0] / "results.jsonl").read_bytes())  # 4 cells finished
    grid = {("input_code", "code_layout"): [("fixed_min", "tile"), ("fixed_min", "repeat"), ("learned", "tile")],
            "seed": [1, 2]}
    result = run_sweep(write_study(tmp_path / "study.py", dataset, grid))
    assert result.returncode == 0, result.stderr
    assert "4 finished before (skipped), 2 to run" in result.stderr  # tile is the default: the same runs
    report = subprocess.run([sys.executable, "report.py", f"--results={tmp_path / 'results.jsonl'}"],
                            cwd=REPO, capture_output=True, text=True)
    assert report.returncode == 0, report.stderr
    loss = {(r["cell"]["input_code"], r["cell"].get("code_layout", "tile"), r["cell"]["seed"]): r["loss"]
            for r in rows(tmp_path)}
    lines = [[c.strip() for c in line.strip("|").split("|")] for line in report.stdout.splitlines()
             if line.startswith("| (one setting) |")]
    assert [line[1] for line in lines] == ["fixed_min", "fixed_min code_layout=repeat", "learned"]
    for line, layout in zip(lines, ("tile", "repeat")):
        differences = [loss["fixed_min", layout, s] - loss["learned", "tile", s] for s in (1, 2)]
        assert line[4] == "2" and line[5].startswith(f"{statistics.mean(differences):+.4f} ± ")
    assert loss["fixed_min", "repeat", 1] != loss["fixed_min", "tile", 1]


# ------------------------------------------- a study over datasets, widths and input scales, and its provenance

@pytest.fixture(scope="module")
def factors(tmp_path_factory, dataset):
    """A study over two datasets (the Shakespeare fixture, and the bundled novels, which sweep.py prepares
    from assets/novels/), two widths on the first, fixed_min at code_scale 0.1 against learned, 2 seeds:
    12 cells. (its folder, the sweep's result)."""
    root = tmp_path_factory.mktemp("factors")
    novels = str(root / "novels")
    grid = {("dataset", "n_embd"): [(dataset, 16), (dataset, 32), (novels, 32)],
            ("input_code", "code_scale"): [("fixed_min", 0.1), ("learned", 1.0)], "seed": [1, 2]}
    prepare = {novels: ["--input=assets/novels/", "--encoding=bytes", "--max_tokens=200000", "--doc_chars=2000",
                        "--workers=1"]}
    result = run_sweep(write_study(root / "study.py", "", grid, prepare=prepare))
    return root, result


def test_a_study_over_datasets_widths_and_scales_records_what_made_each_row(factors, dataset):
    root, result = factors
    assert result.returncode == 0, result.stderr
    found = rows(root)
    assert len(found) == 12 and f"dataset '{root / 'novels'}' is missing, making it" in result.stderr
    with open(root / "novels" / "meta.json") as f:
        assert [os.path.basename(s) for s in json.load(f)["source"]] == [
            "pg1342_austen_pride_and_prejudice.txt.gz", "pg145_eliot_middlemarch.txt.gz"]
    for row in found:
        config = row["config"]
        assert (config["dataset"], config["n_embd"], config["input_code"], config["code_scale"]) == (
            row["cell"]["dataset"], row["cell"]["n_embd"], row["cell"]["input_code"], row["cell"]["code_scale"])
        assert row["code_hash"] == common.code_hash() and row["data_hash"] == common.data_hash(config["dataset"])
        assert row["name"].startswith(config["dataset"].replace("/", "_"))
    assert len({row["data_hash"] for row in found}) == 2
    assert sweep.cell_step({"phase": "train", "out_dir": found[0]["out_dir"], "config": found[0]["config"]}) == \
        "train step 4 of 4"


def test_the_report_of_the_study_shows_each_rows_model_and_fits_the_gap_against_width(factors, dataset):
    root, _ = factors
    result = run_tool("report", [f"--results={root / 'results.jsonl'}", "--fit=True"])
    assert result.returncode == 0, result.stderr
    assert f"every row was made by this checkout's code (code_hash {common.code_hash()})" in result.stdout
    table = [[c.strip() for c in line.strip("|").split("|")] for line in result.stdout.splitlines()
             if line.startswith("| dataset=")]
    assert len(table) == 6 and {(line[-2], line[-1]) for line in table} == {("1", "16"), ("1", "32")}
    loss = {(r["cell"]["dataset"], r["cell"]["n_embd"], r["cell"]["input_code"], r["cell"]["seed"]): r["loss"]
            for r in rows(root)}
    gap = {}
    for width in (16, 32):
        gap[width] = statistics.mean(loss[dataset, width, "fixed_min", s] - loss[dataset, width, "learned", s]
                                     for s in (1, 2))
    fit = next(line for line in result.stdout.splitlines() if line.startswith(f"| {dataset} | fixed_min code_scale=0.1 |"))
    slope = [c.strip() for c in fit.strip("|").split("|")][5]
    assert slope.startswith(f"{gap[32] - gap[16]:+.4f} ± ")  # two widths an octave apart: the slope is the change
    assert "no factor varies" in result.stdout  # the novels: one width

    one_seed = run_tool("report", [f"--results={root / 'results.jsonl'}", "--where=seed=1;n_embd=32"])
    lines = [[c.strip() for c in line.strip("|").split("|")] for line in one_seed.stdout.splitlines()
             if line.startswith("| dataset=")]
    assert len(lines) == 4 and all(line[2] == "1" and line[-1] == "32" for line in lines)
    nothing = run_tool("report", [f"--results={root / 'results.jsonl'}", "--where=seed=7"])
    assert nothing.returncode == 1 and "no results row has seed in 7" in nothing.stderr


def test_rerun_redoes_only_the_cells_that_other_code_made(factors, tmp_path):
    root, _ = factors
    table = [json.loads(line) for line in (root / "results.jsonl").read_text().splitlines()]
    table[0]["code_hash"] = "0123456789abcdef"  # as if made before the last change to model.py
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(row) + "\n" for row in table))
    mixed = run_tool("report", [f"--results={tmp_path / 'results.jsonl'}"])
    assert "this table MIXES 2 code versions" in mixed.stdout and "1 of 12 rows were made by other code" in mixed.stdout
    study = (root / "study.py").read_text().replace(str(root / "results.jsonl"), str(tmp_path / "results.jsonl"))
    (tmp_path / "study.py").write_text(study.replace(str(root / "runs"), str(tmp_path / "runs")))
    plain = run_tool("sweep", [str(tmp_path / "study.py")])
    assert "12 finished before (skipped), 0 to run" in plain.stderr and "1 of the finished cells" in plain.stderr
    rerun = run_tool("sweep", [str(tmp_path / "study.py"), "--rerun=True"])
    assert rerun.returncode == 0, rerun.stderr
    assert "removed 1 rows" in rerun.stderr and "11 finished before (skipped), 1 to run" in rerun.stderr
    after = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert len(after) == 12 and {row["code_hash"] for row in after} == {common.code_hash()}
    assert after[:11] == table[1:]

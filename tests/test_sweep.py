"""sweep.py on a tiny grid end to end: a row per cell, a rerun that retrains nothing, a failing cell that does not
stop the others, SIGTERM, a second sweep of one table, bad study configs; the test split it chooses settings on
(eval.py --split=test); and whether a seed gives every input code the same shared weights (paired seeds)."""
import glob
import json
import math
import os
import re
import runpy
import shutil
import signal
import statistics
import subprocess
import sys
import time

import pytest
import torch

import common
import studies
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


def test_a_dry_run_lists_every_cell_with_its_state_and_commands(study, dataset, tmp_path, capsys):
    (tmp_path / "results.jsonl").write_bytes((study[0] / "results.jsonl").read_bytes())  # 4 cells finished
    grid = {"input_code": ["fixed_min", "learned"], "seed": [1, 2, 3]}
    config = write_study(tmp_path / "study.py", dataset, grid)
    sweep.main([config, "--dry_run=True"])
    listed = capsys.readouterr().out.splitlines()
    states = [line.split(": ")[0] for line in listed]
    assert states == [f"{code}-seed{seed} ({'to run' if seed == 3 else 'finished'})"
                      for code in ("fixed_min", "learned") for seed in (1, 2, 3)]
    out_dir = tmp_path / "runs" / "learned-seed3"
    train, evaluate = listed[-1].split(": ", 1)[1].split(" && ")
    assert train.startswith("python train.py ") and " --input_code=learned --seed=3 --code_seed=3 " in train
    assert train.endswith(f" --out_dir={out_dir}") and evaluate == f"python eval.py --out_dir={out_dir} --split=val"

    sweep.main([config, "--verify=2", "--dry_run=True"])  # the cells a verification would rerun, and where
    listed = capsys.readouterr().out.splitlines()
    assert [line.split(" (its row: loss ")[0] for line in listed] == ["fixed_min-seed1", "learned-seed2"]
    assert f"--out_dir={tmp_path / 'runs-verify' / 'fixed_min-seed1'} " in listed[0]
    assert sorted(os.listdir(tmp_path)) == ["results.jsonl", "study.py"]  # nothing run, nothing recorded


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


READS_RATES = {"study_width.py": "study_width_lr.py", "study_scale.py": "study_width_lr.py",
               "study_tokens.py": "study_width_lr.py", "study_gpu_width.py": "study_gpu_width_lr.py",
               "study_spell.py": "study_spell_lr.py"}


def lacking(step, cells=r"\d+ of the \d+", which=".*"):
    """What a study config that reads its rates from step's table says while that table is partial or absent."""
    return rf"lacks {cells} cells these rates are chosen from \({which}\): finish that step first: " \
           rf"python sweep.py config/{step}$"


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(REPO, "config", "study_*.py"))))
def test_the_bundled_studies_are_valid(path, capsys, monkeypatch):
    monkeypatch.chdir(REPO)  # their paths are relative to the checkout, as in docs/studies.md's commands
    step = READS_RATES.get(os.path.basename(path))
    try:
        sweep.main([path, "--dry_run=True"])
    except UserError as e:  # the step that chooses its rates has not finished (its table is being written)
        assert step and re.search(lacking(step), str(e)), e
        return
    cells = int(capsys.readouterr().err.split(" cells: ")[0])
    assert cells >= 9  # 3 codes x 3 seeds, or x 3 learning rates x 2 seeds


def test_the_spelling_study_takes_each_rate_from_the_step_that_chose_it(tmp_path, capsys, monkeypatch):
    """config/study_spell.py reads spelling's rates, and fixed_min's and learned's at 4 layers, from its step 1,
    and theirs at 2 layers from the width study at width 64: run on made-up tables (in a copy of the configs)
    where step 1's best rate is its lowest and the width study's its highest."""
    (tmp_path / "results").mkdir()
    shutil.copytree(os.path.join(REPO, "config"), tmp_path / "config")
    monkeypatch.chdir(tmp_path)
    tried = {}
    for step, sign, key_names in (("study_width_lr.py", -1, ("dataset", "n_embd", "input_code")),
                                  ("study_spell_lr.py", 1, ("dataset", "n_layer", "input_code"))):
        study = runpy.run_path(os.path.join("config", step))
        with open(study["results"], "w") as f:
            for config in studies.grid_cells(study):  # every cell of the step, as its sweep would write it
                tried.setdefault((step, *(config[k] for k in key_names)), set()).add(config["learning_rate"])
                row = {"cell": {"input_code": config["input_code"], "seed": config["seed"]}, "split": "test",
                       "loss": sign * config["learning_rate"], "config": config}
                f.write(json.dumps(row) + "\n")
    sweep.main([os.path.join("config", "study_spell.py"), "--dry_run=True"])
    choices = runpy.run_path(os.path.join("config", "study_spell_lr.py"))["_choices"]
    commands = [dict(arg[2:].split("=", 1) for arg in line.split() if arg.startswith("--"))
                for line in capsys.readouterr().out.splitlines()]
    assert len(commands) == 45
    for c in commands:
        key = (c["dataset"], int(c["n_layer"]), c["input_code"])
        expected = (min(tried["study_spell_lr.py", *key]) if key in choices else
                    max(tried["study_width_lr.py", c["dataset"], 64, c["input_code"]]))
        assert float(c["learning_rate"]) == expected and int(c["n_layer"]) in (2, 4), c


def test_a_step_reading_rates_from_a_partial_or_absent_table_says_which_cells_it_lacks(tmp_path, monkeypatch, capsys):
    """config/study_width.py reads config/study_width_lr.py's table while that step is still writing it."""
    for folder in ("config", "assets"):
        (tmp_path / folder).symlink_to(os.path.join(REPO, folder))
    (tmp_path / "results").mkdir()
    monkeypatch.chdir(tmp_path)  # results/width_lr.jsonl is the one in tmp_path
    cells = sweep.make_cells(sweep.checked_study(sweep.parse_config(sweep.DEFAULTS, ["config/study_width_lr.py"])))
    with pytest.raises(UserError, match=lacking("study_width_lr.py", f"{len(cells)} of the {len(cells)}")):
        sweep.main(["config/study_width.py", "--dry_run=True"])  # step 1 not begun: no table
    table = [json.dumps({"cell": c["cell"], "name": c["name"], "split": "test", "config": c["config"],
                         "loss": 2 + c["config"]["learning_rate"]}) + "\n" for c in cells]  # the lowest rate wins
    (tmp_path / "results" / "width_lr.jsonl").write_text("".join(table[:40]))  # as the sweep leaves it midway
    with pytest.raises(UserError) as error:
        sweep.main(["config/study_width.py", "--dry_run=True"])
    after = cells[40]["config"]  # the first cell the sweep has not run: step 2 needs every cell of step 1
    first = (f".*; the first: dataset {after['dataset']}, n_embd {after['n_embd']}, input_code {after['input_code']}, "
             f"learning_rate {after['learning_rate']:g}, seed {after['seed']}")
    assert re.search(lacking("study_width_lr.py", f"{len(cells) - 40} of the {len(cells)}", first), str(error.value))
    (tmp_path / "results" / "width_lr.jsonl").write_text("".join(table))
    sweep.main(["config/study_width.py", "--dry_run=True"])
    listed = capsys.readouterr().out.splitlines()
    lowest = min(c["config"]["learning_rate"] for c in cells if c["config"]["n_embd"] == 64 and
                 (c["config"]["dataset"], c["config"]["input_code"]) == ("study_bytes", "fixed_min"))
    assert len(listed) == 72 and listed[0].startswith("study_bytes-") and "n_embd64-fixed_min" in listed[0]
    assert f" --learning_rate={lowest!r} " in listed[0] and "(to run): python train.py config/scale.py" in listed[0]


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
    row_start = f"| {dataset} | fixed_min code_scale=0.1 |"
    fit = next(line for line in result.stdout.splitlines() if line.startswith(row_start))
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


# ------------------------------------------------ verification: a table's cells rerun on the checkout's code

def test_verify_reruns_cells_apart_from_the_study_and_names_one_whose_loss_was_altered(study, dataset, tmp_path):
    """On the code that made the table, one thread a run: the same losses to the last bit. A loss altered in
    the table fails it, naming the cell and the difference; the table itself is never written."""
    (tmp_path / "results.jsonl").write_bytes((study[0] / "results.jsonl").read_bytes())
    config = write_study(tmp_path / "study.py", dataset, CODES_BY_SEEDS)
    passed = run_tool("sweep", [config, "--verify=1"])
    assert passed.returncode == 0, passed.stderr
    record = json.loads((tmp_path / "results.verify.json").read_text())
    assert record["passed"] and record["code_hash"] == common.code_hash() and record["threads"] == 1
    assert record["tolerance"] == sweep.VERIFY_TOLERANCE and record["largest_difference"] == 0.0
    assert [(c["name"], c["difference"]) for c in record["cells"]] == [("fixed_min-seed1", 0.0)]  # to the last bit
    assert sorted(os.listdir(tmp_path)) == ["results.jsonl", "results.verify.json", "study.py"]  # no run folder left

    altered = rows(tmp_path)
    for row in altered:
        row["loss"] += 1e-3 if row["name"] == "fixed_min-seed1" else 0.0
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(row) + "\n" for row in altered))
    table = (tmp_path / "results.jsonl").read_bytes()
    failed = run_tool("sweep", [config, "--verify=1"])
    assert failed.returncode == 1 and failed.stderr.count("error:") == 1
    said = failed.stderr.splitlines()[-1]
    assert said.startswith(f"error: verification of {tmp_path / 'results.jsonl'} failed: 1 cell(s) off by more than "
                           f"{sweep.VERIFY_TOLERANCE:g} nats: fixed_min-seed1 differs by -1.00e-03 ")
    assert "made by this very code" in said  # --rerun=True would keep these rows: it says how to remake them
    assert not json.loads((tmp_path / "results.verify.json").read_text())["passed"]
    assert (tmp_path / "results.jsonl").read_bytes() == table
    kept = glob.glob(str(tmp_path / "runs-verify-*" / "fixed_min-seed1" / "log.txt"))  # the rerun, for its log
    assert len(kept) == 1 and f"the reruns are in {os.path.dirname(os.path.dirname(kept[0]))}" in said


def test_report_says_above_each_table_whether_this_code_made_or_verified_its_rows(study, dataset, tmp_path):
    made_here = tmp_path / "here" / "results.jsonl"
    made_here.parent.mkdir()
    made_here.write_bytes((study[0] / "results.jsonl").read_bytes())
    other = [{**row, "code_hash": "0123456789abcdef"} for row in rows(study[0])]  # as if made before a refactor
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(row) + "\n" for row in other))
    config = write_study(tmp_path / "study.py", dataset, CODES_BY_SEEDS)
    current = common.code_hash()

    def said(table):  # report.py's line above the table
        result = run_tool("report", [f"--results={table}"])
        assert result.returncode == 0, result.stderr
        return next(line for line in result.stdout.splitlines() if line.startswith(f"Code of {table}: "))

    assert said(made_here).endswith(f"every row was made by this checkout's code (code_hash {current}).")
    neither = said(tmp_path / "results.jsonl")
    assert f"4 of 4 rows were made by other code than this checkout's (code_hash {current}), and no verification " \
           f"of them on it is recorded: python sweep.py STUDY --verify=N checks them" in neither
    mixed = [{**row, "code_hash": current} if row["name"] == "learned-seed1" else row for row in other]
    (tmp_path / "mixed.jsonl").write_text("".join(json.dumps(row) + "\n" for row in mixed))
    fewer = run_tool("sweep", [config, f"--results={tmp_path / 'mixed.jsonl'}", "--verify=1"])
    assert "--verify=1 is fewer than the 2 code versions of the table's rows" in fewer.stderr

    verified = run_tool("sweep", [config, "--verify=2"])  # the code that made them is this one, whatever the label
    assert verified.returncode == 0, verified.stderr
    record = json.loads((tmp_path / "results.verify.json").read_text())
    # spread over the codes and the seeds; each rerun's loss is its row's exactly
    assert [(c["name"], c["difference"]) for c in record["cells"]] == [("fixed_min-seed1", 0.0), ("learned-seed2", 0.0)]
    assert said(tmp_path / "results.jsonl").endswith(
        f"4 by 0123456789abcdef; 2 of its cells were rerun on this checkout's code (code_hash {current}) on "
        f"{record['date'][:10]} and matched their rows to within {sweep.VERIFY_TOLERANCE:g} nats (largest difference "
        f"0.0e+00; {tmp_path / 'results.verify.json'}).")
    depth = os.path.join(REPO, "results", "depth.jsonl")
    both = run_tool("report", [f"--results={made_here},{depth}", "--allow_mixed=True"])
    assert [line.split(":")[0] for line in both.stdout.splitlines() if line.startswith("Code of ")] == [
        f"Code of {made_here}", f"Code of {depth}"]  # a line per table

    other[[row["name"] for row in other].index(record["cells"][0]["name"])]["loss"] += 0.01  # remade since, say
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(row) + "\n" for row in other))
    assert "its last verification is of rows no longer in it" in said(tmp_path / "results.jsonl")

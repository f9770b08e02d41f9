"""analyze.py on the suite's Shakespeare runs: the logit lens ends at eval.py's loss, a fixed code's ids
are read exactly at the input, nothing crosses positions before the first block, the probes are a
function of the seed, a subword vocabulary's columns, and every bad input is one line."""
import gzip
import json
import shutil
import sys

import numpy as np
import pytest
import torch

from checkpoint import load_checkpoint, save_checkpoint
from conftest import SHAKESPEARE, TINY_MODEL, run_in_process, run_tool

pytestmark = pytest.mark.xdist_group("analyze")  # one worker: its module fixtures are made once
POSITIONS = 4000  # val positions: a few seconds per analysis of the tiny runs
SMALL = [f"--positions={POSITIONS}", "--train_positions=8192"]


def analysis(runs, tmp_path, *args):
    """analyze.py's --json of runs, run in this process."""
    out = tmp_path / f"analysis{len(list(tmp_path.glob('analysis*')))}.json"
    run_in_process("analyze.py", f"--runs={','.join(runs)}", f"--json={out}", *SMALL, *args)
    return json.loads(out.read_text())


def train_briefly(dataset, out_dir, steps, layers=2):
    run_in_process("train.py", f"--dataset={dataset}", f"--out_dir={out_dir}", *TINY_MODEL, f"--n_layer={layers}",
                   "--batch_size=8", "--gradient_accumulation_steps=1", f"--max_iters={steps}", "--eval_iters=1",
                   f"--eval_interval={steps}", "--warmup_iters=2", f"--lr_decay_iters={steps}",
                   f"--log_interval={steps}")


@pytest.fixture(scope="module")
def bytes_runs(trained_checkpoint):
    return [trained_checkpoint("fixed_min"), trained_checkpoint("learned")]


@pytest.fixture(scope="module")
def bytes_analysis(bytes_runs, tmp_path_factory):
    return analysis(bytes_runs, tmp_path_factory.mktemp("analysis"))


@pytest.fixture(scope="module")
def subword(tmp_path_factory):
    """(dataset, run) of a subword vocabulary: a part of Shakespeare in cl100k_512, a tiny fixed_min model."""
    root = tmp_path_factory.mktemp("subword")
    with gzip.open(SHAKESPEARE, "rt", encoding="utf-8") as f:
        (root / "part.txt").write_text(f.read(200_000))
    run_in_process("prepare.py", f"--input={root / 'part.txt'}", "--dataset=sub", "--encoding=cl100k_512",
                   f"--out_root={root}", "--workers=1")
    train_briefly(root / "sub", root / "run", steps=20)
    return str(root / "sub"), str(root / "run")


@pytest.fixture(scope="module")
def subword_analysis(subword, tmp_path_factory):
    """analyze.py's --json of the subword run, and the folder where it drew its --plot (inside.png)."""
    folder = tmp_path_factory.mktemp("subword_analysis")
    return analysis([subword[1]], folder, f"--plot={folder / 'inside.png'}")["runs"][0], folder


def test_the_lens_last_layer_is_eval_py_loss_on_the_same_tokens(bytes_runs, bytes_analysis, tmp_path):
    for run, result in zip(bytes_runs, bytes_analysis["runs"]):
        copy = tmp_path / result["input_code"]  # eval.py writes eval.json: not into the shared fixture's folder
        shutil.copytree(run, copy)
        run_in_process("eval.py", f"--out_dir={copy}", f"--max_val_tokens={POSITIONS + 1}")
        evaluated = json.loads((copy / "eval.json").read_text())
        assert evaluated["tokens"] == result["val_positions"] == POSITIONS
        lens = [layer["lens_loss"] for layer in result["layers"]]
        assert lens[-1] == pytest.approx(evaluated["loss"], abs=1e-5)
        assert len(lens) == result["n_layer"] + 1 and lens[0] > lens[-1]


def test_a_fixed_code_is_read_exactly_at_the_input(bytes_analysis, subword_analysis):
    fixed_min = bytes_analysis["runs"][0]
    assert fixed_min["input_code"] == "fixed_min"
    ceiling, _ = fixed_min["references"]["current id"]  # val positions whose id the probe saw in train
    assert fixed_min["layers"][0]["probes"]["current id"] == ceiling > 0.99
    result, _ = subword_analysis  # 512 ids, most of them rare: the ceiling is well below 1
    ceiling, _ = result["references"]["current id"]
    assert result["layers"][0]["probes"]["current id"] == ceiling < 0.999


def test_no_probe_reads_the_previous_token_at_the_input_better_than_the_current_token_alone(
        bytes_analysis, shakespeare_bytes):
    # The best guess of the previous token from the current one: the reverse bigram table of train, by counting.
    train = np.fromfile(f"{shakespeare_bytes}/train.bin", dtype=np.uint16).astype(np.int64)
    val = np.fromfile(f"{shakespeare_bytes}/val.bin", dtype=np.uint16).astype(np.int64)
    V = 257
    table = np.bincount(train[1:] * V + train[:-1], minlength=V * V).reshape(V, V).argmax(1)
    T = bytes_analysis["runs"][0]["block_size"]
    seen = [i for i in range(POSITIONS) if i % T]  # a window's first position does not see its previous token
    best = float(np.mean(table[val[seen]] == val[np.array(seen) - 1]))
    for result in bytes_analysis["runs"]:
        assert result["references"]["previous id"][0] == pytest.approx(best, abs=1e-3)
        at_input = result["layers"][0]["probes"]["previous id"]
        assert at_input <= best, result["input_code"]


def test_probe_scores_are_a_function_of_the_seed(bytes_runs, bytes_analysis, tmp_path):
    def scores(result):
        return [[layer["probes"] for layer in run["layers"]] for run in result["runs"]]

    assert scores(analysis(bytes_runs, tmp_path, "--seed=1")) == scores(bytes_analysis)
    assert scores(analysis(bytes_runs, tmp_path, "--seed=2")) != scores(bytes_analysis)


def test_a_subword_vocabulary_gets_its_columns_pairs_and_a_figure(subword_analysis):
    result, folder = subword_analysis
    assert (folder / "inside.png").read_bytes()[:4] == b"\x89PNG"
    layer = result["layers"][0]
    assert set(layer["probes"]) == {"current id", "previous id", "word start (leading space + letter)",
                                    "frequency band (train quarters)"}
    assert result["pairs"] >= 2 and -1 <= layer["pair_cosine"] <= 1


def test_runs_of_different_depths_are_compared_by_relative_depth(trained_checkpoint, shakespeare_bytes, tmp_path):
    shallow = tmp_path / "one_layer"
    train_briefly(shakespeare_bytes, shallow, steps=10, layers=1)
    runs = [trained_checkpoint("fixed_min"), str(shallow)]
    result = analysis(runs, tmp_path, f"--plot={tmp_path / 'depths.png'}")
    assert [[layer["relative_depth"] for layer in run["layers"]] for run in result["runs"]] == [[0, 0.5, 1], [0, 1]]
    assert (tmp_path / "depths.png").read_bytes()[:4] == b"\x89PNG"


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory, shakespeare_bytes, trained_checkpoint, subword):
    root = tmp_path_factory.mktemp("bad")
    (root / "empty").mkdir()
    shutil.copytree(shakespeare_bytes, root / "other_data")
    checkpoint = load_checkpoint(trained_checkpoint("fixed_min"))
    checkpoint["config"]["dataset"] = str(root / "other_data")
    save_checkpoint(checkpoint, str(root / "other_run"))  # the same model, trained (it says) on other data
    shutil.copytree(shakespeare_bytes, root / "no_train")
    (root / "no_train" / "train.bin").unlink()
    return root


BAD = {  # name: (arguments, what the one line says); RUN is the bytes fixed_min run
    "no runs": (["--runs="], "no runs given"),
    "no checkpoint": (["--runs={bad}/empty"], "no checkpoint in"),
    "no folder": (["--runs={bad}/missing"], "does not exist"),
    "different vocabularies": (["--runs={run},{sub_run}"], "runs of different vocabularies"),
    "dataset of another vocabulary": (["--runs={run}", "--dataset={sub_data}"], "but the runs were trained on bytes"),
    "runs of different datasets": (["--runs={run},{bad}/other_run"], "--dataset=NAME"),
    "no such dataset": (["--runs={run}", "--dataset={bad}/nowhere"], "not found"),
    "no train split": (["--runs={run}", "--dataset={bad}/no_train"], "has no train split"),
    "no positions": (["--runs={run}", "--positions=0"], "must be at least 1"),
    "negative seed": (["--runs={run}", "--seed=-1"], "seed must be 0 or more"),
    "too many positions": (["--runs={run}", f"--train_positions={10 ** 12}"], "lower --positions"),
    "plot not png": (["--runs={run}", "--plot=inside.jpg"], "must name a .png"),
    "json unwritable": (["--runs={run}", "--json={bad}/missing/out.json"], "cannot write"),
    "unknown key": (["--runs={run}", "--postions=10"], "did you mean 'positions'"),
}


@pytest.mark.parametrize("name", BAD)
def test_bad_inputs_are_one_line(name, bad_inputs, trained_checkpoint, subword):
    args, says = BAD[name]
    places = {"bad": bad_inputs, "run": trained_checkpoint("fixed_min"), "sub_data": subword[0], "sub_run": subword[1]}
    result = run_tool("analyze", [arg.format(**places) for arg in args])
    assert result.returncode == 1 and result.stdout == ""
    assert len(result.stderr.strip().splitlines()) == 1 and result.stderr.startswith("error: "), result.stderr
    assert says in result.stderr, result.stderr


def test_help_lists_every_key():
    result = run_tool("analyze", ["--help"])
    assert result.returncode == 0 and all(f"--{key}=" in result.stdout for key in ("runs", "positions", "seed"))


def test_a_plot_without_matplotlib_is_one_line_naming_it(trained_checkpoint, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # what an install without matplotlib raises
    result = run_tool("analyze", [f"--runs={trained_checkpoint('fixed_min')}", f"--plot={tmp_path / 'inside.png'}"])
    assert result.returncode == 1 and result.stderr == "error: --plot needs matplotlib: pip install matplotlib\n"


def test_the_softmax_probe_also_reads_a_fixed_code_exactly_and_no_previous_token_at_the_input(
        trained_checkpoint, tmp_path):
    run = trained_checkpoint("fixed_min")
    result = analysis([run], tmp_path, "--probe=softmax", "--train_positions=512")["runs"][0]
    at_input = result["layers"][0]["probes"]
    assert at_input["current id"] == result["references"]["current id"][0] > 0.9
    assert at_input["previous id"] <= result["references"]["previous id"][0]


def test_positions_too_few_for_a_column_leave_it_empty(trained_checkpoint, tmp_path):
    result = analysis([trained_checkpoint("fixed_min")], tmp_path, "--positions=1", "--train_positions=1")["runs"][0]
    assert result["val_positions"] == 1 and result["pairs"] == 0
    assert result["layers"][0]["probes"]["previous id"] is None  # the one position starts its window

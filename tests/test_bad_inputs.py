"""Bad inputs to every command-line tool: each gets one `error:` line naming the problem, a non-zero exit,
no traceback, and every file that existed before is byte-identical afterwards.

The tools run in this process through common.run_main, exactly as their `__main__` blocks call them,
so that dozens of cases cost seconds; test_every_tool_speaks_the_same_way_as_a_subprocess checks that
the same holds for real processes. The server's flags are here too; its HTTP errors are in test_serve.py."""
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch

from conftest import REPO, run_tool


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, shakespeare_bytes, trained_checkpoint):
    """A folder holding a dataset, a trained run, a foreign export folder and a few odd files."""
    root = tmp_path_factory.mktemp("workspace")
    shutil.copytree(shakespeare_bytes, root / "data")
    shutil.copytree(trained_checkpoint("fixed_min"), root / "run")
    (root / "corrupt").mkdir()
    shutil.copy(root / "data" / "train.bin", root / "corrupt" / "train.bin")
    shutil.copy(root / "data" / "val.bin", root / "corrupt" / "val.bin")
    (root / "corrupt" / "meta.json").write_text("{not json")
    (root / "partial").mkdir()
    (root / "partial" / "meta.json").write_text(json.dumps({"encoding": "bytes"}))
    (root / "mine").mkdir()
    (root / "mine" / "notes.txt").write_text("a folder of the user's, not an export")
    (root / "a_file").write_text("not a folder")
    (root / "syntax.py").write_text("batch_size = = 3\n")
    (root / "raises.py").write_text("batch_size = 1 // 0\n")
    (root / "typo.py").write_text("learning_rat = 1e-3\n")
    return root


def snapshot(root):
    files = {}
    for folder, _, names in os.walk(root):
        for name in names:
            path = os.path.join(folder, name)
            with open(path, "rb") as f:
                files[os.path.relpath(path, root)] = f.read()
    return files


T = "{root}"  # stands for the workspace folder in the cases below
TINY = ["--n_layer=1", "--n_head=2", "--n_embd=32", "--block_size=16", "--compile=False", "--device=cpu"]
TRAIN = ["--dataset={root}/data", "--out_dir={root}/new", *TINY]
CASES = [  # (tool, arguments, a word the error line must contain)
    ("train", [*TRAIN, "--dropout=2"], "dropout"),
    ("train", [*TRAIN, "--dropout=-0.1"], "dropout"),
    ("train", [*TRAIN, "--input_code=foo"], "input_code"),
    ("train", [*TRAIN, "--n_embd=128", "--n_head=3"], "n_head"),
    ("train", [*TRAIN, "--batch_size=0"], "batch_size"),
    ("train", [*TRAIN, "--batch_size=-1"], "batch_size"),
    ("train", [*TRAIN, "--eval_interval=0"], "eval_interval"),
    ("train", [*TRAIN, "--eval_iters=0"], "eval_iters"),
    ("train", [*TRAIN, "--log_interval=0"], "log_interval"),
    ("train", [*TRAIN, "--learning_rate=-1"], "learning_rate"),
    ("train", [*TRAIN, "--learning_rate=nan"], "finite"),
    ("train", [*TRAIN, "--min_lr=1.0"], "min_lr"),
    ("train", [*TRAIN, "--gradient_accumulation_steps=0"], "gradient_accumulation_steps"),
    ("train", [*TRAIN, "--max_iters=-1"], "max_iters"),
    ("train", [*TRAIN, "--max_iters=ten"], "max_iters"),
    ("train", [*TRAIN, "--beta1=1.5"], "beta1"),
    ("train", [*TRAIN, "--grad_clip=-1"], "grad_clip"),
    ("train", [*TRAIN, "--weight_decay=-0.1"], "weight_decay"),
    ("train", [*TRAIN, "--block_size=0"], "block_size"),
    ("train", [*TRAIN, "--block_size=100000000"], "block_size"),
    ("train", [*TRAIN, "--n_layer=0"], "n_layer"),
    ("train", [*TRAIN, "--device=tpu"], "device"),
    ("train", [*TRAIN, "--device=cuda"], "CUDA"),
    ("train", [*TRAIN, "--dtype=float64"], "dtype"),
    ("train", [*TRAIN, "--init_from=gpt2"], "init_from"),
    ("train", [*TRAIN, "--n_layr=2"], "n_layer"),
    ("train", [*TRAIN, "--batch_size"], "--key=value"),
    ("train", [*TRAIN, "--compile=maybe"], "compile"),
    ("train", [*TRAIN, "--out_dir={root}/a_file"], "not a folder"),
    ("train", [*TRAIN, "--out_dir=/proc/no/such/place"], "out_dir"),
    ("train", [*TRAIN, "--out_dir={root}/run"], "already holds a run"),
    ("train", [*TRAIN, "--dataset={root}/corrupt"], "not valid JSON"),
    ("train", [*TRAIN, "--dataset={root}/partial"], "lacks"),
    ("train", [*TRAIN, "--dataset={root}/nowhere"], "prepare.py"),
    ("train", [*TRAIN, "{root}/syntax.py"], "not valid Python"),
    ("train", [*TRAIN, "{root}/raises.py"], "ZeroDivisionError"),
    ("train", [*TRAIN, "{root}/typo.py"], "learning_rate"),
    ("train", [*TRAIN, "{root}/missing.py"], "not found"),
    ("train", [*TRAIN, "--batch_size=None"], "batch_size"),
    ("train", [*TRAIN, "--seed=-1"], "seed"),
    ("train", [*TRAIN, f"--seed={2 ** 64}"], "seed"),
    ("train", [*TRAIN, "--rope_theta=0"], "rope_theta"),
    ("train", [*TRAIN, "--threads=-1"], "threads"),
    ("train", [*TRAIN, "--dataset={root}/to_make", "--prepare=5"], "prepare must be a list"),
    *([("train", [*TRAIN, "--out_dir={root}/run", "--overwrite=True", "--wandb_log=True"], "pip install wandb")]
      if importlib.util.find_spec("wandb") is None else []),  # refused before the run it would replace is cleared
    ("train", ["--init_from=resume", "--out_dir={root}/nowhere"], "resume"),
    ("train", ["--init_from=resume", "--out_dir={root}/run", "--n_layer=3"], "another model"),
    ("train", ["--init_from=resume", "--out_dir={root}/run"], "finished at step 40 (max_iters 40)"),
    ("train", ["--init_from=resume", "--out_dir={root}/run/ckpt.pt", "--max_iters=30"], "with M above 40"),
    ("eval", ["--out_dir={root}/run", "--batch_size=-1"], "batch_size"),
    ("eval", ["--out_dir={root}/run", "--max_val_tokens=-5"], "max_val_tokens"),
    ("eval", ["--out_dir={root}/run", "--threads=-1"], "threads"),
    ("eval", ["--out_dir={root}/nowhere"], "does not exist"),
    ("eval", ["--out_dir={root}/run", "--dataset={root}/corrupt"], "not valid JSON"),
    ("eval", ["--out_dir={root}/run", "--device=tpu"], "device"),
    ("eval", ["--out_dir={root}/run", "--dtype=half"], "dtype"),
    ("eval", ["--out_dir={root}/run", "--max_tokens=5"], "max_val_tokens"),
    ("sample", ["--out_dir={root}/run", "--num_samples=0"], "num_samples"),
    ("sample", ["--out_dir={root}/run", "--temperature=-1"], "temperature"),
    ("sample", ["--out_dir={root}/run", "--top_p=0"], "top_p"),
    ("sample", ["--out_dir={root}/run", "--top_p=2"], "top_p"),
    ("sample", ["--out_dir={root}/run", "--top_p=None"], "top_p"),  # None only where a key takes it (top_k)
    ("sample", ["--out_dir={root}/run", "--top_k=-3"], "top_k"),
    ("sample", ["--out_dir={root}/run", "--max_new_tokens=-1"], "max_new_tokens"),
    ("sample", ["--out_dir={root}/run", "--threads=-2"], "threads"),
    ("sample", ["--out_dir={root}/run", "--start=FILE:{root}/no_prompt.txt"], "prompt file"),
    ("sample", ["--out_dir={root}/nowhere"], "does not exist"),
    ("sample", ["--out_dir={root}/a_file"], "a_file"),
    ("bench", [*TINY, "--block_size=64", "--dataset={root}/data", "--codes=foo"], "foo"),
    ("bench", [*TINY, "--block_size=64", "--dataset={root}/data", "--steps=0"], "steps"),
    ("bench", [*TINY, "--block_size=64", "--dataset={root}/data", "--decode_batch_sizes=0"], "decode_batch_sizes"),
    ("bench", [*TINY, "--block_size=64", "--dataset={root}/data", "--decode_batch_sizes=a,b"], "decode_batch_sizes"),
    ("bench", [*TINY, "--block_size=64", "--dataset={root}/data", "--sdpa=bogus"], "sdpa"),
    ("bench", [*TINY, "--block_size=64", "--dataset={root}/data", "--prompt_tokens=0"], "prompt_tokens"),
    ("bench", ["--suite=gpu", "--device=cpu", "--n_layer=4"], "sets its own n_layer"),
    ("bench", ["--suite=tpu", "--device=cpu"], "suite must be gpu"),
    ("bench", ["--suite=gpu", "--device=cpu", "--budget_s=0"], "budget_s"),
    ("bench", ["--suite=nanogpt", "--nanogpt={root}/nowhere"], "a checkout of https://github.com/karpathy/nanoGPT"),
    *([("bench", ["--suite=gpu"], "--device=cpu rehearses")] if not torch.cuda.is_available() else []),
    ("export_hf", ["--out_dir={root}/nowhere"], "does not exist"),
    ("export_hf", ["--out_dir={root}/run", "--hf_dir={root}/mine"], "earlier export"),
    ("export_hf", ["--out_dir={root}/run", "--hf_dri=x"], "hf_dir"),
    ("report", [], "no runs given"),
    ("report", ["--runs={root}/nowhere*"], "no run folder matches"),
    ("report", ["--runs={root}/run", "--plot={root}/figure.txt"], ".png"),
    ("report", ["--runs={root}/run"], "eval.py"),
    ("report", ["--runs={root}/data"], "no checkpoint"),
    ("serve", ["--out_dir={root}/run", "--port=99999"], "port"),
    ("serve", ["--out_dir={root}/run", "--port=-1"], "port"),
    ("serve", ["--out_dir={root}/run", "--max_tokens_cap=-1"], "max_tokens_cap"),
    ("serve", ["--out_dir={root}/run", "--max_body_bytes=0"], "max_body_bytes"),
    ("serve", ["--out_dir={root}/run", "--max_batch_size=0"], "max_batch_size"),
    ("serve", ["--out_dir={root}/run", "--max_queue=-1"], "max_queue"),
    ("serve", ["--out_dir={root}/run", "--kv_cache_mib=0"], "kv_cache_mib"),
    ("serve", ["--out_dir={root}/run", "--prefill_tokens=0"], "prefill_tokens"),
    ("serve", ["--out_dir={root}/run", "--host=no.such.host.invalid", "--port=0"], "host"),
    ("serve", ["--out_dir={root}/run", "--porrt=8000"], "port"),
    ("prepare", ["--input={root}/no_such.txt", "--dataset=x", "--out_root={root}/prepared"], "not found"),
    ("prepare", ["--dataset=x", "--val_fraction=2", "--out_root={root}/prepared"], "val_fraction"),
    ("prepare", ["--dataset=x", "--mix=0.5", "--out_root={root}/prepared"], "mix"),
    ("prepare", ["--dataset=x", "--workers=0", "--out_root={root}/prepared"], "workers"),
    ("prepare", ["--dataset=../x", "--out_root={root}/prepared"], "dataset"),
    ("prepare", ["--dataset=x", "--encoding=nope", "--out_root={root}/prepared"], "nope"),
    ("prepare", ["--dataset=x", "--out_root={root}/a_file"], "out_root"),
    ("sample", ["{root}/run"], "run folder (it holds ckpt.pt): give it as --out_dir="),  # a run where a config goes
    ("eval", ["{root}/run"], "give it as --out_dir="),
    ("eval", ["{root}/run/ckpt.pt"], "a checkpoint: give it as --out_dir="),
    ("train", ["{root}/run"], "run folder"),
    ("export_hf", ["{root}/mine"], "a folder"),
]


@pytest.mark.parametrize("tool, args, mentions", CASES, ids=[f"{t}:{' '.join(a[-1:])}" for t, a, _ in CASES])
def test_bad_input_is_one_line_and_changes_nothing(workspace, tool, args, mentions):
    argv = [arg.format(root=workspace) for arg in args]
    before = snapshot(workspace)
    result = run_tool(tool, argv)
    stderr = result.stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert result.returncode not in (0, None), stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert mentions in lines[0], lines[0]
    assert snapshot(workspace) == before


def test_train_makes_a_missing_dataset_as_its_config_says(tmp_path):
    """config/quickstart.py's way: `prepare` names prepare.py's arguments; one line says what is made."""
    dataset = tmp_path / "shakespeare"
    result = run_tool("train", ["config/quickstart.py", f"--dataset={dataset}", f"--out_dir={tmp_path / 'run'}",
                                *TINY, "--max_iters=1", "--eval_iters=1"])
    assert result.returncode == 0, result.stderr
    assert json.loads((dataset / "meta.json").read_text())["encoding"] == "bytes"
    made = [line for line in result.stderr.splitlines() if "prepare.py" in line]
    assert made == [f"dataset '{dataset}' is missing, making it: python prepare.py --input=assets/tinyshakespeare"
                    f".txt.gz --encoding=bytes --out_root={tmp_path} --dataset=shakespeare"]
    failed = run_tool("train", [f"--dataset={tmp_path / 'other'}", "--prepare=['--input=no_such.txt']",
                                f"--out_dir={tmp_path / 'run2'}", *TINY])
    assert failed.returncode == 1 and failed.stderr.splitlines()[-1] == (
        f"error: prepare.py failed to make dataset '{tmp_path / 'other'}': input not found: no_such.txt")
    assert sorted(os.listdir(tmp_path)) == ["run", "shakespeare"]


def test_a_checkpoint_path_works_wherever_a_run_folder_does(trained_checkpoint, tmp_path):
    """--out_dir=RUN/ckpt.pt: what a tool writes goes into RUN, as with --out_dir=RUN."""
    run = tmp_path / "run"
    shutil.copytree(trained_checkpoint("fixed_min"), run)
    ckpt = f"--out_dir={run / 'ckpt.pt'}"
    for tool, argv in (("eval", [ckpt, "--max_val_tokens=2000"]), ("sample", [ckpt, "--max_new_tokens=4"]),
                       ("train", ["--init_from=resume", ckpt, "--max_iters=42", "--log_interval=1"])):
        result = run_tool(tool, argv)
        assert result.returncode == 0, (tool, result.stderr)
    assert (run / "eval.json").is_file()
    assert max(json.loads(line)["iter"] for line in open(run / "metrics.jsonl")) == 42
    if importlib.util.find_spec("transformers") and importlib.util.find_spec("safetensors"):
        assert run_tool("export_hf", [ckpt]).returncode == 0 and (run / "hf" / "config.json").is_file()


def test_every_tool_speaks_the_same_way_as_a_subprocess(workspace):
    """One bad setting per tool, as a real process: exit code 1, one line on stderr, nothing on stdout."""
    procs = {tool: subprocess.Popen([sys.executable, f"{tool}.py", "--no_such_key=1"], cwd=REPO, text=True,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for tool in ("train", "eval", "sample", "bench", "export_hf", "prepare", "report", "serve")}
    for tool, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=120)
        assert proc.returncode == 1, (tool, stderr)
        assert stderr.strip().splitlines() == [stderr.strip()] and "no_such_key" in stderr, (tool, stderr)
        assert stdout == ""


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_an_interrupted_tool_stops_with_one_line_and_no_traceback(workspace, signum):
    """sample.py mid-generation (eval.py, export_hf.py and bench.py share its entry point, common.run_main)."""
    proc = subprocess.Popen([sys.executable, "sample.py", f"--out_dir={workspace / 'run'}", "--max_new_tokens=1000000",
                             "--stop_at_eot=False", "--device=cpu"], cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout.read(1)  # generating
    proc.send_signal(signum)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signum
    lines = [line for line in stderr.splitlines() if line.strip() and not line.startswith("checkpoint ")]
    assert lines == [f"interrupted ({signal.Signals(signum).name})"], stderr

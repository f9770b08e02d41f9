"""train.py --parallel=fsdp (FSDP2) on CPU with gloo: the losses of one process, exact resume, one checkpoint
format that DDP and FSDP runs resume from each other across world sizes, two torchrun "nodes", the per-process
memory bench.py measures, and the settings FSDP refuses."""
import json
import shutil
import subprocess
import sys

import pytest
import torch

import distributed
from checkpoint import load_checkpoint, model_config
from configurator import parse_config
from conftest import REPO, run_tool
from model import GPT
from test_distributed import metrics, two_nodes
from test_train import error_line, train, train_py
from training import DEFAULTS

# dropout, and a gradient norm above grad_clip = 1 in the first steps: clipping over the sharded gradient counts
STEPS = ["--batch_size=4", "--gradient_accumulation_steps=4", "--eval_interval=3", "--eval_iters=3", "--log_interval=1",
         "--learning_rate=3e-3", "--warmup_iters=2", "--lr_decay_iters=6", "--dropout=0.1"]
TORCHRUN = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2")
LOGGED = ("loss", "val_loss", "train_loss")


def assert_same_losses(a, b, exact=False):
    for key in LOGGED:
        x, y = metrics(a, key), metrics(b, key)
        assert [i for i, _ in x] == [i for i, _ in y] and len(x) > 1, (key, x, y)
        assert x == y if exact else all(abs(u - v) < 1e-5 for (_, u), (_, v) in zip(x, y)), (key, x, y)


@pytest.fixture(scope="module")
def one_process(shakespeare_bytes, tmp_path_factory):
    """(the run folder of 6 steps on one process, a copy of its checkpoint at step 3), in process."""
    root = tmp_path_factory.mktemp("one_process")
    train(root / "run", shakespeare_bytes, *STEPS, "--max_iters=3", in_process=True)
    shutil.copytree(root / "run", root / "at3")
    result = run_tool("train", [f"--out_dir={root / 'run'}", "--init_from=resume", "--max_iters=6"])
    assert result.returncode == 0, result.stderr[-3000:]
    return root / "run", root / "at3"


def test_two_fsdp_processes_log_the_losses_of_one_resume_exactly_and_write_the_one_checkpoint_format(
        one_process, shakespeare_bytes, tmp_path):
    reference, _ = one_process
    train(tmp_path / "full", shakespeare_bytes, *STEPS, "--max_iters=6", "--parallel=fsdp", launcher=TORCHRUN)
    assert_same_losses(tmp_path / "full", reference)
    # the same keys, shapes and optimizer layout as a one-process checkpoint: gathered whole onto rank 0
    ours, theirs = load_checkpoint(str(tmp_path / "full")), load_checkpoint(str(reference))
    assert {k: v.shape for k, v in ours["model"].items()} == {k: v.shape for k, v in theirs["model"].items()}
    assert ours["optimizer"]["param_groups"] == theirs["optimizer"]["param_groups"]
    assert {i: {k: t.shape for k, t in s.items()} for i, s in ours["optimizer"]["state"].items()} == \
        {i: {k: t.shape for k, t in s.items()} for i, s in theirs["optimizer"]["state"].items()}

    train(tmp_path / "half", shakespeare_bytes, *STEPS, "--max_iters=3", "--parallel=fsdp", launcher=TORCHRUN)
    shutil.copytree(tmp_path / "half", tmp_path / "to_ddp")
    result = train_py([f"--out_dir={tmp_path / 'half'}", "--init_from=resume", "--max_iters=6"], TORCHRUN)
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same_losses(tmp_path / "half", tmp_path / "full", exact=True)
    # the FSDP checkpoint of 2 processes, resumed by one process under DDP
    result = run_tool("train", [f"--out_dir={tmp_path / 'to_ddp'}", "--init_from=resume", "--max_iters=6",
                                "--parallel=ddp"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same_losses(tmp_path / "to_ddp", reference)


def test_a_one_process_checkpoint_resumes_under_fsdp_on_two_torchrun_nodes(one_process, tmp_path):
    reference, at3 = one_process
    shutil.copytree(at3, tmp_path / "run")
    for code, stderr in two_nodes([tmp_path, tmp_path], [f"--out_dir={tmp_path / 'run'}", "--init_from=resume",
                                                         "--max_iters=6", "--parallel=fsdp"], tmp_path):
        assert code == 0, stderr[-3000:]
    assert_same_losses(tmp_path / "run", reference)
    assert load_checkpoint(str(tmp_path / "run"))["config"]["parallel"] == "fsdp"


def test_fsdp_on_one_process_says_it_shards_nothing_and_activation_checkpointing_changes_no_loss(
        one_process, shakespeare_bytes, tmp_path):
    reference, _ = one_process
    for parallel in ("fsdp", "ddp"):
        result = train(tmp_path / parallel, shakespeare_bytes, *STEPS, "--max_iters=3", f"--parallel={parallel}",
                       "--activation_checkpointing=True", in_process=True)
        assert ("on 1 process shards nothing" in result.stderr) == (parallel == "fsdp")
        for key in LOGGED:
            ours = metrics(tmp_path / parallel, key)
            assert ours and ours == pytest.approx(metrics(reference, key)[:len(ours)], abs=1e-5)


@pytest.mark.parametrize("bad,match", [
    (["--parallel=zero"], "parallel must be ddp or fsdp, got 'zero'"),
    (["--parallel=fsdp", "--dtype=float16"], "parallel=fsdp cannot train in float16"),
    (["--parallel=fsdp", "old torch"], "parallel=fsdp needs torch >= 2.6"),
])
def test_fsdp_settings_it_cannot_run_are_one_line(bad, match, shakespeare_bytes, tmp_path, monkeypatch):
    if "old torch" in bad:  # a torch without torch.distributed.fsdp.fully_shard
        monkeypatch.setattr(distributed, "fsdp_available", lambda: False)
        bad = bad[:1]
    line = error_line(train(tmp_path, shakespeare_bytes, *bad, check=False, in_process=True))
    assert line.startswith("error: ") and match in line


def test_bench_measures_each_of_two_fsdp_processes_holding_half_the_weights_gradients_and_adamw_state(tmp_path):
    bench = ["bench.py", "--n_layer=2", "--n_head=4", "--n_embd=64", "--block_size=32", "--vocab_size=257",
             "--batch_size=2", "--gradient_accumulation_steps=2", "--compile=False", "--device=cpu",
             "--codes=fixed_min", "--decode=False",
             "--parallel=fsdp"]
    result = run_tool("bench", [*bench[1:], f"--json={tmp_path / 'one.json'}"])
    assert result.returncode == 0, result.stderr[-3000:]
    result = subprocess.run([*TORCHRUN, *bench, f"--json={tmp_path / 'two.json'}"], cwd=REPO, capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    [[one]] = json.loads((tmp_path / "one.json").read_text())
    [ranks] = json.loads((tmp_path / "two.json").read_text())
    assert len(ranks) == 2 and "| fixed_min | 1 |" in result.stdout
    for part in ("weights", "gradients", "optimizer_state"):
        assert all(0.45 < r[part] / one[part] < 0.55 for r in ranks), (part, one, ranks)
    assert sum(r["weights"] for r in ranks) == one["weights"]  # slices of the same tensors, nothing held twice


def test_the_larger_configs_are_the_readmes_models_and_the_papers_token_budget():
    for name, parameters, learned_table in (("gpt_1b3", 1_342_277_632, 134_217_728),
                                            ("gpt_7b", 6_711_152_640, 268_435_456)):
        cfg = parse_config(DEFAULTS, [f"{REPO}/config/{name}.py"])
        for code, trainable in (("fixed_min", parameters), ("learned", parameters + learned_table)):
            with torch.device("meta"):
                model = GPT(model_config(cfg, vocab_size=65536, input_code=code))
            assert model.param_counts()["trainable"] == trainable
        tokens = cfg["batch_size"] * cfg["gradient_accumulation_steps"] * cfg["block_size"] * cfg["max_iters"]
        assert tokens == 17_039_360_000 and cfg["gradient_accumulation_steps"] % 16 == 0  # 8 or 16 GPUs
    assert parse_config(DEFAULTS, [f"{REPO}/config/gpt_7b.py"])["parallel"] == "fsdp"

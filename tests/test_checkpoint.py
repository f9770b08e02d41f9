"""checkpoint.py: a checkpoint changed on disk, or holding non-finite weights, is refused by every tool."""
import os
import random
import shutil

import pytest
import torch

from checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from conftest import run_tool


def one_error_line(result):
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    return lines[0]


def tool_commands(run_dir, tmp_path):
    return {
        "train resume": ["train.py", "--init_from=resume", f"--out_dir={run_dir}", "--max_iters=80"],
        "eval": ["eval.py", f"--out_dir={run_dir}"],
        "sample": ["sample.py", f"--out_dir={run_dir}", "--max_new_tokens=5"],
        "export": ["export_hf.py", f"--out_dir={run_dir}", f"--hf_dir={tmp_path / 'hf'}"],
        "serve": ["serve.py", f"--out_dir={run_dir}", "--port=0"],
    }


def damaged_copy(trained_checkpoint, tmp_path, damage):
    run_dir = tmp_path / "run"
    shutil.copytree(trained_checkpoint("fixed_min"), run_dir)
    path = run_dir / "ckpt.pt"
    data = bytearray(path.read_bytes())
    damage(data, random.Random(0))
    path.write_bytes(bytes(data))
    return run_dir


def flip_a_few_bytes(data, rng):
    middle = len(data) // 2
    for i in range(middle, middle + 16):
        data[i] ^= 0xFF


def overwrite_the_middle(data, rng):
    size = min(1 << 20, len(data) // 3)
    start = len(data) // 2 - size // 2
    data[start:start + size] = rng.randbytes(size)


@pytest.mark.parametrize("damage", [flip_a_few_bytes, overwrite_the_middle])
def test_every_tool_refuses_a_damaged_checkpoint_in_one_line(trained_checkpoint, tmp_path, damage):
    run_dir = damaged_copy(trained_checkpoint, tmp_path, damage)
    before = sorted(os.listdir(run_dir))
    for tool, (script, *args) in tool_commands(run_dir, tmp_path).items():
        line = one_error_line(run_tool(script.removesuffix(".py"), args))
        assert "ckpt.pt" in line and ("corrupted" in line or "cannot read" in line), (tool, line)
    assert sorted(os.listdir(run_dir)) == before  # nothing was started from it: no eval.json, no export
    assert not (tmp_path / "hf").exists()


def test_the_checksum_covers_every_tensor_and_setting(trained_checkpoint, tmp_path):
    checkpoint = load_checkpoint(trained_checkpoint("fixed_min"))
    for change in ("weight", "optimizer", "config"):
        altered = {**checkpoint}
        if change == "weight":
            name = next(iter(checkpoint["model"]))
            altered["model"] = {**checkpoint["model"], name: checkpoint["model"][name].clone()}
            altered["model"][name].view(-1)[0] += 1e-6
        elif change == "optimizer":
            altered["optimizer"] = {**checkpoint["optimizer"], "param_groups": [
                {**group, "lr": group["lr"] * 2} for group in checkpoint["optimizer"]["param_groups"]]}
        else:
            altered["config"] = {**checkpoint["config"], "seed": checkpoint["config"]["seed"] + 1}
        save_checkpoint(checkpoint, tmp_path / change)
        path = tmp_path / change / "ckpt.pt"
        saved = torch.load(path, weights_only=True)
        torch.save({**altered, "sha256": saved["sha256"]}, path)  # new contents under the old checksum
        with pytest.raises(CheckpointError, match="corrupted"):
            load_checkpoint(str(tmp_path / change))


def test_non_finite_weights_are_refused(trained_checkpoint, tmp_path):
    checkpoint = load_checkpoint(trained_checkpoint("fixed_min"))
    name = next(n for n, t in checkpoint["model"].items() if t.is_floating_point())
    weights = {**checkpoint["model"], name: checkpoint["model"][name].clone()}
    weights[name].view(-1)[3] = float("nan")
    save_checkpoint({**checkpoint, "model": weights}, tmp_path)
    with pytest.raises(CheckpointError, match=f"non-finite weights \\({name}"):
        load_checkpoint(str(tmp_path))


def test_a_checkpoint_written_before_checksums_still_loads(trained_checkpoint, tmp_path):
    checkpoint = load_checkpoint(trained_checkpoint("fixed_min"))
    torch.save(checkpoint, tmp_path / "ckpt.pt")  # as the repository wrote them before: no sha256
    loaded = load_checkpoint(str(tmp_path))
    assert all(torch.equal(loaded["model"][k], v) for k, v in checkpoint["model"].items())

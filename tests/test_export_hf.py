"""export_hf.py: the exported folder loads offline with transformers and is our model, number for number."""
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import shakespeare_text
from checkpoint import build_model, load_checkpoint, save_checkpoint
from engine import generate_stream
from model import GPT, GPTConfig
from tokenizer import BUNDLED_FILE, get_encoding

pytestmark = pytest.mark.xdist_group("export_hf")  # one worker: its module fixtures are made once

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CODES = ["fixed_min", "affine", "learned"]
MODEL_CARD_PROMPT = "Question: What is the capital of France?\nAnswer:"
MODEL_CARD_EXAMPLE = """\
from transformers import AutoTokenizer, AutoModelForCausalLM
tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=True)
model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)
inputs = tokenizer("Question: What is the capital of France?\\nAnswer:", return_tensors="pt")
outputs = model.generate(inputs["input_ids"], max_new_tokens=3, do_sample=False)
print(tokenizer.decode(outputs[0]))
"""


def shakespeare(start, length):
    return shakespeare_text()[start:start + length]


def run(script, *args, env=None, cwd=REPO):
    return subprocess.run([sys.executable, script, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


@pytest.fixture(scope="module")
def hf_env(tmp_path_factory):
    """Offline, with transformers' caches (remote code modules included) in a temp folder; set before
    transformers is imported, since it reads them then."""
    pytest.importorskip("safetensors")
    env = {"HF_HOME": str(tmp_path_factory.mktemp("hf_home")), "HF_HUB_OFFLINE": "1"}
    patch = pytest.MonkeyPatch()
    for key, value in env.items():
        patch.setenv(key, value)
    yield {**os.environ, **env}
    patch.undo()


@pytest.fixture(scope="module")
def transformers(hf_env):
    return pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def cl100k_checkpoint(tmp_path_factory):
    """An untrained tiny affine-code GPT over the bundled 65,536-token tokenizer (K = 16)."""
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=65536, block_size=32, n_layer=1, n_head=2, n_embd=32, input_code="affine",
                       code_seed=3)
    out_dir = str(tmp_path_factory.mktemp("run_cl100k"))
    meta = {"encoding": "cl100k_65536", "vocab_size": 65536, "eot_token": 65535}
    save_checkpoint({"model_args": vars(config), "model": GPT(config).state_dict(), "meta": meta, "config": {},
                     "iter_num": 0, "tokens_seen": 0}, out_dir)
    return out_dir


@pytest.fixture(scope="module")
def exported(trained_checkpoint, cl100k_checkpoint, transformers, tmp_path_factory):
    """exported(name) -> (our model, the transformers model, its tokenizer, hf_dir); name is an input code
    (a tiny model trained on Shakespeare bytes) or 'cl100k' (the untrained 65,536-token one)."""
    import export_hf
    made = {}

    def make(name):
        if name not in made:
            out_dir = cl100k_checkpoint if name == "cl100k" else trained_checkpoint(name)
            hf_dir = str(tmp_path_factory.mktemp(f"hf_{name}") / "hf")
            export_hf.export(out_dir, hf_dir)
            model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, trust_remote_code=True)
            tokenizer = transformers.AutoTokenizer.from_pretrained(hf_dir, trust_remote_code=True)
            made[name] = build_model(load_checkpoint(out_dir)), model.eval(), tokenizer, hf_dir
        return made[name]

    return make


@pytest.mark.parametrize("name", CODES + ["cl100k"])
def test_weights_and_all_buffers_arrive_bit_for_bit(exported, name):
    ours, theirs, _, hf_dir = exported(name)
    from safetensors.torch import load_file
    stored = load_file(os.path.join(hf_dir, "model.safetensors"))
    for key, value in ours.state_dict().items():
        assert stored[f"gpt.{key}"].dtype == value.dtype and torch.equal(stored[f"gpt.{key}"], value), key
    loaded = dict(theirs.gpt.named_parameters()) | dict(theirs.gpt.named_buffers())
    everything = dict(ours.named_parameters()) | dict(ours.named_buffers())  # rotary tables and bit indices too
    assert loaded.keys() == everything.keys()
    for key, value in everything.items():
        assert loaded[key].dtype == value.dtype and torch.equal(loaded[key], value), key
    if ours.config.input_code == "affine":
        assert theirs.gpt.embed.A.dtype == torch.uint8 and stored["gpt.embed.A"].dtype == torch.uint8
        assert theirs.gpt.embed.A.shape == (ours.embed.K, ours.embed.K)


def test_config_carries_the_context_length_where_transformers_and_lm_eval_read_it(exported):
    ours, theirs, tokenizer, hf_dir = exported("fixed_min")
    with open(os.path.join(hf_dir, "config.json")) as f:
        assert json.load(f)["max_position_embeddings"] == ours.config.block_size
    assert theirs.config.max_position_embeddings == tokenizer.model_max_length == ours.config.block_size


@pytest.mark.parametrize("name", CODES + ["cl100k"])
def test_logits_and_loss_equal_ours(exported, name):
    ours, theirs, tokenizer, _ = exported(name)
    T = ours.config.block_size
    ids = torch.tensor([tokenizer.encode(shakespeare(start, 400))[:T] for start in (1000, 50_000)])
    with torch.no_grad():
        expected, _ = ours(ids)
        out = theirs(ids, labels=ids)
        _, expected_loss = ours(ids[:, :-1], ids[:, 1:])
    assert out.logits.dtype == torch.float32 and out.logits.shape == (2, T, ours.config.vocab_size)
    assert (out.logits - expected).abs().max().item() < 1e-5
    assert abs(out.loss.item() - expected_loss.item()) < 1e-5


@pytest.mark.parametrize("name", CODES + ["cl100k"])
def test_greedy_generate_equals_ours_past_the_context(exported, name):
    ours, theirs, tokenizer, _ = exported(name)
    T = ours.config.block_size
    prompt = torch.tensor([tokenizer.encode(shakespeare(start, 400))[:T - 8] for start in (2000, 90_000)])
    new = 24  # runs 16 tokens past block_size: both must crop to the last block_size tokens
    theirs_out = theirs.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new,
                                 do_sample=False)
    ours_out = generate_stream(ours, prompt, new, temperature=0, eos_id=tokenizer.eos_token_id)
    assert torch.equal(theirs_out, torch.cat((prompt, *ours_out), dim=1))


def test_seeded_sampling_equals_ours_past_the_context(exported):
    """transformers' sampling (top_k, temperature 1) from the global generator seeded s draws the tokens
    that engine.py draws from a generator seeded s: the same probabilities, the same uniforms."""
    ours, theirs, tokenizer, _ = exported("fixed_min")
    prompt = torch.tensor([tokenizer.encode(shakespeare(3000, 400))[:ours.config.block_size - 8]])
    outputs = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        outputs.append(theirs.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=24,
                                       do_sample=True, top_k=20, temperature=1.0))
        drawn = generate_stream(ours, prompt, 24, top_k=20, eos_id=tokenizer.eos_token_id,
                                generator=torch.Generator().manual_seed(seed))
        assert torch.equal(outputs[-1], torch.cat((prompt, *drawn), dim=1))
    assert not torch.equal(*outputs)  # drawn, not greedy


def test_greedy_generate_equals_sample_py(exported, trained_checkpoint, hf_env):
    _, theirs, tokenizer, _ = exported("fixed_min")
    prompt, new = "ROMEO:\nWhat say", 30
    out = theirs.generate(tokenizer(prompt, return_tensors="pt")["input_ids"], max_new_tokens=new, do_sample=False)
    result = run("sample.py", f"--out_dir={trained_checkpoint('fixed_min')}", f"--start={prompt}", "--temperature=0",
                 f"--max_new_tokens={new}", env=hf_env)
    assert result.returncode == 0, result.stderr
    assert out.shape[1] == len(tokenizer.encode(prompt)) + new
    assert result.stdout == tokenizer.decode(out[0]) + "\n"


def test_right_padding_keeps_logits_and_left_padding_is_refused(exported):
    ours, theirs, tokenizer, _ = exported("learned")
    texts = [shakespeare(0, 12), shakespeare(500, 30)]
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = theirs(**batch).logits
        alone, _ = ours(torch.tensor([tokenizer.encode(texts[0])]))
    assert (logits[0, :12] - alone[0]).abs().max().item() < 1e-5
    tokenizer.padding_side = "left"
    try:
        with pytest.raises(ValueError, match="pad batches on the right"):
            theirs(**tokenizer(texts, padding=True, return_tensors="pt"))
    finally:
        tokenizer.padding_side = "right"


def test_generate_refuses_a_padded_batch_at_once_and_says_why(exported):
    """Right padding keeps the logits of the tokens before it, but generate() would put its new tokens
    after the padding: refused before the first (wrong) token, with what to do instead."""
    _, theirs, tokenizer, _ = exported("learned")
    batch = tokenizer([shakespeare(0, 12), shakespeare(500, 30)], padding=True, return_tensors="pt")
    with pytest.raises(ValueError, match=r"generate\(\) cannot take a padded batch.*one at a time"):
        theirs.generate(**batch, max_new_tokens=2, do_sample=False)


@pytest.mark.parametrize("name, encoding", [("fixed_min", "bytes"), ("cl100k", "cl100k_65536")])
def test_tokenizer_is_tiktoken(exported, transformers, name, encoding, tmp_path):
    _, _, tokenizer, hf_dir = exported(name)
    enc = get_encoding(encoding)
    texts = [shakespeare(0, 3000), "naïve café, 東京, emoji 🙂 and\ttabs\r\n  spaces", ""]
    for text in texts:
        ids = tokenizer.encode(text)
        assert ids == enc.encode_ordinary(text)
        assert tokenizer.decode(ids) == enc.decode(ids) == text
        assert tokenizer.convert_tokens_to_ids(tokenizer.convert_ids_to_tokens(ids)) == ids
    with_eot = "one document<|endoftext|>another"
    assert tokenizer.encode(with_eot) == enc.encode(with_eot, allowed_special="all")
    assert tokenizer.decode(tokenizer.encode(with_eot), skip_special_tokens=True) == "one documentanother"
    split_character = enc.encode("é")[:1] if encoding == "bytes" else enc.encode("🙂")[:1]
    assert tokenizer.decode(split_character) == enc.decode(split_character)  # half a character: U+FFFD
    assert tokenizer.eos_token == "<|endoftext|>" and tokenizer.eos_token_id == enc.eot_token
    assert len(tokenizer) == tokenizer.vocab_size == len(tokenizer.get_vocab()) == enc.n_vocab
    if encoding == "cl100k_65536":
        with open(BUNDLED_FILE, "rb") as bundled, open(os.path.join(hf_dir, "tokenizer.tiktoken"), "rb") as f:
            assert f.read() == bundled.read()
    tokenizer.save_pretrained(tmp_path)
    again = transformers.AutoTokenizer.from_pretrained(tmp_path, trust_remote_code=True)
    assert again.encode(texts[0]) == enc.encode_ordinary(texts[0])


def test_cli_export_runs_the_model_card_example_offline(trained_checkpoint, hf_env, tmp_path):
    import export_hf
    out_dir = trained_checkpoint("affine")
    hf_dir = tmp_path / "exported"
    export_hf.export(trained_checkpoint("fixed_min"), str(hf_dir))
    result = run("export_hf.py", f"--out_dir={out_dir}", f"--hf_dir={hf_dir}")  # replaces the earlier export
    assert result.returncode == 0, result.stderr
    assert os.listdir(tmp_path) == ["exported"]  # no staging folders left behind
    (hf_dir / "README.md").write_text("my model card")
    with pytest.raises(ValueError, match="holds files of yours"):  # an export with a file added is the user's now
        export_hf.export(out_dir, str(hf_dir))
    assert (hf_dir / "README.md").read_text() == "my model card"
    with open(os.path.join(REPO, "model.py"), "rb") as ours, open(hf_dir / "model.py", "rb") as copied:
        assert copied.read() == ours.read()
    # run where the repository is not importable: the folder must stand on its own
    result = run("-c", f"path = {str(hf_dir)!r}\n" + MODEL_CARD_EXAMPLE, env=hf_env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    enc = get_encoding("bytes")
    ids = torch.tensor([enc.encode_ordinary(MODEL_CARD_PROMPT)])
    expected = torch.cat((ids, *generate_stream(build_model(load_checkpoint(out_dir)), ids, 3, temperature=0)), dim=1)
    assert result.stdout == enc.decode(expected[0].tolist()) + "\n"


def error_of(result):
    assert result.returncode != 0 and "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    return lines[0]


def test_cli_errors_are_one_line_and_write_nothing(trained_checkpoint, tmp_path):
    message = error_of(run("export_hf.py", f"--out_dir={tmp_path / 'nope'}", f"--hf_dir={tmp_path / 'hf'}"))
    assert "does not exist" in message and not (tmp_path / "hf").exists()

    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "notes.txt").write_text("mine")
    message = error_of(run("export_hf.py", f"--out_dir={trained_checkpoint('fixed_min')}", f"--hf_dir={occupied}"))
    assert "not an earlier export" in message
    assert os.listdir(occupied) == ["notes.txt"] and (occupied / "notes.txt").read_text() == "mine"


def test_a_folder_that_cannot_be_made_is_one_line_and_writes_nothing(trained_checkpoint, tmp_path):
    import export_hf
    (tmp_path / "file").write_text("mine")
    message = error_of(run("export_hf.py", f"--out_dir={trained_checkpoint('fixed_min')}",
                           f"--hf_dir={tmp_path / 'file' / 'hf'}"))
    assert f"a file is in the way of '{tmp_path / 'file'}'" in message
    with pytest.raises(ValueError, match="cannot create --hf_dir"):  # a deeper path through the file
        export_hf.export(trained_checkpoint("fixed_min"), str(tmp_path / "file" / "sub" / "hf"))
    assert os.listdir(tmp_path) == ["file"] and (tmp_path / "file").read_text() == "mine"
    if os.path.isdir("/proc"):  # a pseudo file system: no folder can be made there
        with pytest.raises(ValueError, match="cannot create --hf_dir '/proc/hf'"):
            export_hf.export(trained_checkpoint("fixed_min"), "/proc/hf")


def test_an_encoding_the_folder_cannot_hold_is_refused(trained_checkpoint, tmp_path):
    import export_hf
    checkpoint = load_checkpoint(trained_checkpoint("fixed_min"))
    checkpoint["meta"]["encoding"] = "no_such_encoding"
    save_checkpoint(checkpoint, str(tmp_path / "run"))
    with pytest.raises(ValueError, match="cannot be exported"):
        export_hf.export(str(tmp_path / "run"), str(tmp_path / "hf"))
    assert not (tmp_path / "hf").exists()

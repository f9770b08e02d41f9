"""The input-code contract, run over every code in model.CODES (one added later is tested too), the
layouts, the new codes, old checkpoints, and a code registered from outside model.py end to end."""
import hashlib
import json
import math
import os
import subprocess
import sys
from collections import Counter
from dataclasses import asdict, fields

import pytest
import torch

import model
from checkpoint import CheckpointError, build_model, load_checkpoint, load_weights, save_checkpoint
from common import UserError, run_main
from conftest import recomputed
from engine import generate_stream
from model import CODES, GPT, LAYOUTS, BinaryCode, GPTConfig, code_bits, code_fields, make_norm
from test_export_hf import hf_env, transformers  # noqa: F401 (fixtures: offline transformers in a temp HF_HOME)
from tokenizer import get_encoding, token_bytes

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BYTES_META = {"encoding": "bytes", "vocab_size": 257, "eot_token": 256}
TINY_TRAINING = ["--n_layer=1", "--n_head=2", "--n_embd=32", "--block_size=32", "--batch_size=4",  # for train.main
                 "--gradient_accumulation_steps=1", "--eval_iters=1", "--warmup_iters=1", "--log_interval=3",
                 "--compile=False", "--device=cpu"]


def code_settings(name, vocab_size, layout=None):
    """GPTConfig settings that make code `name` valid: a width above K where the code reads code_width
    (3 K: it divides neither 64 nor 1024, so the partial-tile and uneven-repeat cases run too), and the
    layout where it reads one. A code with a GPTConfig field of its own gives it a working default."""
    settings = {"input_code": name}
    if "code_width" in CODES[name].reads:
        settings["code_width"] = 3 * code_bits(vocab_size)
    if layout is not None:
        settings["code_layout"] = layout
    return settings


def variants():
    """(name, layout) for every registered code and every layout it can take; None: it has no layout."""
    return [(name, layout) for name, cls in CODES.items()
            for layout in (LAYOUTS if "code_layout" in cls.reads else [None])]


VARIANTS = variants()
IDS = [f"{name}-{layout}" if layout else name for name, layout in VARIANTS]


def tiny(name, layout=None, **overrides):
    base = dict(vocab_size=257, block_size=32, n_layer=2, n_head=4, n_embd=64)
    return GPTConfig(**{**base, **code_settings(name, 257, layout), **overrides})


def spelt(embed):
    """embed, given the bytes encoding's tokens (V = 257) if its code is made from them (spelling), as
    train.py gives a new model its dataset's."""
    if embed.needs_token_bytes:
        embed.set_token_bytes(token_bytes(get_encoding("bytes")))
    return embed


def distinct_rows(x):
    """Whether no two rows of x are equal, decided exactly: rows whose random float64 projections differ
    are different rows; only rows with tied projections (almost never any) are compared entry by entry."""
    r = torch.randn(x.size(1), dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    _, inverse, counts = torch.unique(x.double() @ r, return_inverse=True, return_counts=True)
    tied = counts[inverse] > 1
    return torch.unique(x[tied], dim=0).size(0) == int(tied.sum())


# ------------------------------------------------------------------------------ the contract

@pytest.mark.parametrize("name", CODES)
def test_first_block_reads_an_injective_code_of_all_ids_at_paper_width(name):
    """What the first block reads, norm_1(embed(t)), differs for every pair of the 65,536 ids. Exact
    equality is the right test: two ids with equal vectors are the same input to everything after.
    (One layout: both copy the same code bits, each bit onto at least one channel; see the layout tests.)"""
    config = GPTConfig(**code_settings(name, 65536), n_layer=1)
    embed, norm_1 = CODES[name](config), make_norm(config)  # what GPT builds as embed and blocks[0].norm_1
    if embed.needs_token_bytes:  # some spelling: each id's two bytes (loading cl100k_65536 would take seconds)
        embed.set_token_bytes([t.to_bytes(2, "little") for t in range(65536)])
    with torch.no_grad():
        seen = torch.cat([norm_1(embed(ids)) for ids in torch.arange(65536).split(16384)])
    assert seen.shape == (65536, 1024) and distinct_rows(seen)


def decoder_params(c):
    """Trainable parameters outside the input, the same for every code: per block attention (4 n^2),
    MLP (8 n^2) and two norms (2 n), then the final norm and the V x n lm_head (bias=False)."""
    return c.n_layer * (12 * c.n_embd ** 2 + 2 * c.n_embd) + c.n_embd + c.vocab_size * c.n_embd


@pytest.mark.parametrize("name", CODES)
def test_trainable_input_parameters_are_as_documented(name):
    """trainable_params(config) of each code is what its module holds, at a tiny and the paper config,
    and the code changes nothing else of the model."""
    with torch.device("meta"):
        for config in (tiny(name), GPTConfig(**code_settings(name, 65536))):
            counts = GPT(config).param_counts()
            assert counts["input_trainable"] == CODES[name].trainable_params(config)
            assert counts["trainable"] == decoder_params(config) + CODES[name].trainable_params(config)
    assert all(not b.requires_grad for b in GPT(tiny(name)).embed.buffers())


FRESH_PROCESS = """
import json, sys
sys.path.insert(0, {repo!r})
sys.path.insert(0, {tests!r})
from test_codes import code_digests
print(json.dumps(code_digests()))
"""


def code_digests(code_seed=3):
    """{variant: sha256 of the input vectors of all 257 ids}, inputs built after torch.manual_seed(0)."""
    digests = {}
    for (name, layout), label in zip(VARIANTS, IDS):
        torch.manual_seed(0)  # the trainable codes' init comes from torch's seed, the fixed ones' from code_seed
        embed = spelt(CODES[name](tiny(name, layout, code_seed=code_seed)))
        with torch.no_grad():
            digests[label] = hashlib.sha256(embed(torch.arange(257)).numpy().tobytes()).hexdigest()
    return digests


def test_same_code_seed_gives_the_same_code_in_a_fresh_process():
    script = FRESH_PROCESS.format(repo=REPO, tests=os.path.join(REPO, "tests"))
    printed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    here = code_digests()
    assert json.loads(printed) == here
    other = code_digests(code_seed=4)
    for (name, _), label in zip(VARIANTS, IDS):
        assert (other[label] != here[label]) == ("code_seed" in CODES[name].reads), label


def save_untrained(config, out_dir, meta=BYTES_META):
    torch.manual_seed(0)
    gpt = GPT(config)
    spelt(gpt.embed)
    save_checkpoint({"model_args": asdict(config), "model": gpt.state_dict(), "meta": meta, "config": {},
                     "iter_num": 0, "tokens_seen": 0}, str(out_dir))
    return gpt.eval()


@pytest.mark.parametrize("name,layout", VARIANTS, ids=IDS)
def test_checkpoint_round_trip_keeps_the_code(name, layout, tmp_path):
    gpt = save_untrained(tiny(name, layout, code_seed=5), tmp_path)
    loaded = build_model(load_checkpoint(str(tmp_path)))
    ids = torch.randint(0, 257, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded(ids)[0], gpt(ids)[0])
    other = GPT(tiny(name, layout, code_seed=6))  # a checkpoint's stored code wins over a fresh draw
    spelt(other.embed)
    other.load_state_dict(gpt.state_dict())
    assert torch.equal(other.embed(ids), gpt.embed(ids))


@pytest.mark.parametrize("name,layout", VARIANTS, ids=IDS)
def test_kv_cache_generation_equals_recomputing_every_step(name, layout):
    torch.manual_seed(0)
    gpt = GPT(tiny(name, layout)).eval()
    spelt(gpt.embed)
    prompt = torch.randint(0, 257, (3, 40))  # longer than block_size: cropped from the left
    out = torch.cat(list(generate_stream(gpt, prompt, 30, temperature=0)), dim=1)  # past the context too
    assert torch.equal(out, recomputed(gpt, prompt, 30, temperature=0)[:, 40:])


@pytest.mark.parametrize("name", CODES)
def test_training_step_under_cpu_bf16_autocast_matches_float32(name):
    torch.manual_seed(0)
    gpt = GPT(tiny(name))
    spelt(gpt.embed)
    ids = torch.randint(0, 257, (2, 33))
    _, loss32 = gpt(ids[:, :-1], ids[:, 1:])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, loss16 = gpt(ids[:, :-1], ids[:, 1:])
    loss16.backward()
    assert abs(loss16.item() - loss32.item()) < 0.05
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in gpt.parameters())


def sample_greedy(capsys, out_dir, prompt, new):
    import sample
    capsys.readouterr()
    sample.main([f"--out_dir={out_dir}", f"--start={prompt}", "--temperature=0", f"--max_new_tokens={new}",
                 "--device=cpu"])
    return capsys.readouterr().out


def load_export(transformers, hf_dir):
    return (transformers.AutoModelForCausalLM.from_pretrained(str(hf_dir), trust_remote_code=True).eval(),
            transformers.AutoTokenizer.from_pretrained(str(hf_dir), trust_remote_code=True))


def check_export(ours, theirs, tokenizer, sampled, prompt, new):
    ids = torch.randint(0, ours.config.vocab_size, (2, ours.config.block_size),
                        generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (theirs(ids).logits - ours(ids)[0]).abs().max().item() < 1e-5
    out = theirs.generate(tokenizer(prompt, return_tensors="pt")["input_ids"], max_new_tokens=new, do_sample=False)
    # both stop at <|endoftext|>: sample.py before printing it, transformers' generate after
    assert sampled == tokenizer.decode(out[0]).split("<|endoftext|>")[0] + "\n"


# 'repeat' where a code has a layout: the tile layout is the default, which tests/test_export_hf.py exports
EXPORTED = [(name, "repeat" if "code_layout" in cls.reads else None) for name, cls in CODES.items()]


@pytest.mark.parametrize("name,layout", EXPORTED, ids=list(CODES))
def test_hf_export_round_trips_and_matches_sample_py(name, layout, transformers, tmp_path, capsys):
    config = tiny(name, layout, code_seed=7)
    ours = save_untrained(config, tmp_path / "run")
    prompt, new = "ROMEO:", 12
    sampled = sample_greedy(capsys, tmp_path / "run", prompt, new)
    import export_hf
    # transformers caches remote code by folder name: one folder per code
    export_hf.export(str(tmp_path / "run"), str(tmp_path / f"hf_{name}"))
    theirs, tokenizer = load_export(transformers, tmp_path / f"hf_{name}")
    assert asdict(theirs.gpt.config) == asdict(config)
    check_export(ours, theirs, tokenizer, sampled, prompt, new)


# ------------------------------------------------------------------------------ layouts

@pytest.mark.parametrize("n_embd,width", [(1024, 16), (64, 9), (1024, 48), (64, 64), (48, 17)])
def test_layouts_put_every_bit_on_its_channels(n_embd, width):
    tile, repeat = channel_bits("tile", n_embd, width), channel_bits("repeat", n_embd, width)
    assert torch.equal(tile, torch.arange(n_embd) % width)
    # repeat: contiguous runs in bit order, each bit present, run lengths floor or ceil of n_embd / width
    assert torch.equal(repeat, torch.sort(repeat).values) and set(repeat.tolist()) == set(range(width))
    assert torch.equal(repeat, torch.arange(n_embd) * width // n_embd)
    runs = torch.bincount(repeat, minlength=width)
    assert set(runs.tolist()) <= {n_embd // width, -(-n_embd // width)}
    if n_embd % width == 0:  # the author's checkpoints: bits.repeat_interleave(n_embd / K)
        assert torch.equal(repeat, torch.arange(width).repeat_interleave(n_embd // width))


@pytest.mark.parametrize("code_values", ["bipolar", "binary"])
def test_repeat_layout_is_repeat_interleave_of_the_code(code_values):
    """The author's released frozen-code models: {0, 1} values, bit k on channels 64k .. 64k+63."""
    ids = torch.arange(0, 65536, 7)
    embed = paper_vocab_input(1024, code_layout="repeat", code_values=code_values)
    bits = ((ids[:, None] >> torch.arange(16)) & 1).float()
    assert torch.equal(embed(ids), ((2 * bits - 1) if code_values == "bipolar" else bits).repeat_interleave(64, dim=-1))


def channel_bits(layout, n_embd, width):
    return LAYOUTS[layout](torch.arange(width), n_embd)


# K = 8 divides 64; K = 9 does not, but both give bit 0 the spare channel
@pytest.mark.parametrize("vocab_size", [256, 257])
def test_tile_and_repeat_are_one_network_up_to_a_permutation_of_residual_channels(vocab_size):
    """A repeat model equals the tile model whose residual channels are permuted by P: the same logits
    (float64, up to the rounding of reordered sums). Initial weights are i.i.d., so the permuted weights
    are as likely as the originals, and AdamW is elementwise: the layouts train identically in distribution."""
    K = code_bits(vocab_size)
    tile_bits, repeat_bits = channel_bits("tile", 64, K), channel_bits("repeat", 64, K)
    assert torch.equal(torch.bincount(tile_bits), torch.bincount(repeat_bits))  # else no P exists
    P = torch.argsort(tile_bits, stable=True)  # repeat's channels are in bit order: the r-th copy of bit k to the r-th
    assert torch.equal(tile_bits[P], repeat_bits)
    tile_model = GPT(tiny("fixed_min", "tile", vocab_size=vocab_size)).double()
    repeat_model = GPT(tiny("fixed_min", "repeat", vocab_size=vocab_size)).double()
    ids = torch.randint(0, vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    assert torch.equal(repeat_model.embed(ids), tile_model.embed(ids)[..., P])
    with torch.no_grad():
        for (name, p), q in zip(tile_model.named_parameters(), repeat_model.parameters()):
            if name.endswith(("norm_1.weight", "norm_2.weight", "norm_f.weight", "c_proj.weight")):
                q.copy_(p[P])  # the norms' per-channel weights, and the projections that write the residual stream
            else:  # c_attn, c_fc and lm_head read it
                q.copy_(p[:, P])
        diff = (repeat_model(ids)[0] - tile_model(ids)[0]).abs().max().item()
    assert diff < 1e-12


def test_uneven_layouts_can_differ_in_which_bits_get_the_spare_channels():
    tile_runs, repeat_runs = (torch.bincount(channel_bits(layout, 1024, 48)) for layout in ("tile", "repeat"))
    assert tile_runs[:16].tolist() == [22] * 16 and tile_runs[16:].tolist() == [21] * 32  # the first 1024 mod 48 bits
    assert repeat_runs[::3].tolist() == [22] * 16 and repeat_runs.sum() == 1024  # every third bit


# ------------------------------------------------------------------------------ the new codes

def bits_of(ids, K):
    return (ids[:, None] >> torch.arange(K)) & 1


def paper_vocab_input(n_embd=64, **settings):
    """GPT.embed alone, for V = 65,536 (K = 16), without the V x n_embd lm_head a whole GPT would build."""
    config = GPTConfig(n_layer=1, n_head=1, n_embd=n_embd, **settings)
    return CODES[config.input_code](config)


def code_of(embed, ids, width):
    """The 0/1 bits a lifted code puts on its first channels in tile layout (bit 1 is the larger value)."""
    return (embed(ids)[:, :width] > 0).long()


def test_gray_code_is_t_xor_t_shifted_and_neighbours_differ_in_one_bit():
    ids = torch.arange(65536)
    embed = paper_vocab_input(input_code="gray")
    gray = code_of(embed, ids, 16)
    assert torch.equal(gray, bits_of(ids ^ (ids >> 1), 16))
    assert torch.equal((gray[1:] != gray[:-1]).sum(1), torch.ones(65535, dtype=torch.long))


def test_permuted_code_is_a_stored_bijection_with_no_xor_structure():
    ids = torch.arange(65536)
    embed = paper_vocab_input(input_code="permuted", code_seed=1)
    assert embed.perm.dtype == torch.int64 and torch.equal(torch.sort(embed.perm).values, ids)
    assert torch.equal(code_of(embed, ids, 16), bits_of(embed.perm, 16))
    # an affine map f has f(x ^ y ^ z) = f(x) ^ f(y) ^ f(z) for all x, y, z; a random permutation does not
    x, y, z = torch.randint(0, 65536, (3, 1000), generator=torch.Generator().manual_seed(0))
    for code, expect in (("affine", True), ("permuted", False)):
        f = paper_vocab_input(input_code=code)
        u = lambda t: (code_of(f, t, 16) << torch.arange(16)).sum(1)
        assert bool((u(x ^ y ^ z) == u(x) ^ u(y) ^ u(z)).all()) == expect, code


@pytest.mark.parametrize("width", [64, 256])
def test_random_wide_codes_are_distinct_stored_bits_spread_like_the_minimal_code(width):
    embed = paper_vocab_input(512, input_code="random_wide", code_width=width, code_layout="repeat")
    ids = torch.arange(0, 65536, 5)
    assert embed.codebook.shape == (65536, width) and embed.codebook.dtype == torch.uint8
    assert torch.unique(embed.codebook, dim=0).size(0) == 65536
    assert torch.equal(embed(ids), (2 * embed.codebook[ids].float() - 1).repeat_interleave(512 // width, dim=-1))


def test_random_wide_redraws_collisions_even_when_barely_wider_than_K():
    codes = model.draw_wide_codes(512, 10, seed=0)  # 512 of 1,024 codes: most first draws collide somewhere
    assert torch.unique(codes, dim=0).size(0) == 512


def test_learned_lift_is_a_trainable_K_by_n_embd_map_of_the_code():
    gpt = GPT(tiny("learned_lift"))
    ids = torch.arange(257)
    weight = gpt.embed.lift.weight
    assert weight.shape == (64, 9) and weight.requires_grad
    bipolar = 2 * bits_of(ids, 9).float() - 1
    assert torch.allclose(gpt.embed(ids), bipolar @ weight.T)
    _, loss = gpt(ids[None, :32], ids[None, 1:33])
    loss.backward()
    assert weight.grad.abs().sum() > 0


def spelling_input(encoding, **settings):
    """GPT.embed of the spelling code for an encoding's vocabulary at width 64 (64 code bits: channel j
    carries bit j), given the encoding's tokens as train.py gives them."""
    config = GPTConfig(vocab_size=encoding.n_vocab, n_layer=1, n_head=1, n_embd=64, input_code="spelling",
                       code_width=64, **settings)
    embed = CODES["spelling"](config)
    embed.set_token_bytes(token_bytes(encoding))
    return embed


def simhash_agreement(a, b):
    """1 - angle / pi between two tokens' n-gram count vectors: how often one SimHash bit of theirs agrees."""
    ca, cb = Counter(model.ngram_keys(a)), Counter(model.ngram_keys(b))
    dot = sum(ca[key] * cb[key] for key in ca)
    cos = dot / math.sqrt(sum(n * n for n in ca.values()) * sum(n * n for n in cb.values()))
    return 1 - math.acos(min(cos, 1.0)) / math.pi


def test_spelling_is_the_id_code_then_a_simhash_of_the_ngrams_relating_word_and_space_word():
    """On cl100k_4096 (K = 12): fixed_min's 12 bits, then 52 spelling bits on which two tokens agree, on
    average over pairs, as often as SimHash says (1 - angle / pi of their n-gram counts): the 558 pairs
    ' word' / 'word' of the vocabulary on about 0.8 of them, random pairs on about half."""
    encoding = get_encoding("cl100k_4096")
    pieces, ids = token_bytes(encoding), torch.arange(4096)
    bits = code_of(spelling_input(encoding), ids, 64)
    assert torch.equal(bits[:, :12], bits_of(ids, 12))
    spelling = bits[:, 12:]
    known = {piece: t for t, piece in enumerate(pieces) if piece}
    words = [(t, known[piece[1:]]) for piece, t in known.items()
             if piece[:1] == b" " and piece[1:2].isalpha() and piece[1:] in known]
    others = torch.randint(0, 4095, (2000, 2), generator=torch.Generator().manual_seed(0)).tolist()  # not 4095: eot
    agreement = {}
    for name, pairs in (("words", words), ("others", others)):
        a, b = torch.tensor(pairs).T
        agreement[name] = (spelling[a] == spelling[b]).float().mean().item()
        expected = sum(simhash_agreement(pieces[x], pieces[y]) for x, y in pairs) / len(pairs)
        assert abs(agreement[name] - expected) < 0.03, name
    assert len(words) == 558 and agreement["words"] > 0.75 and agreement["others"] < 0.56


def test_on_bytes_the_spelling_is_the_byte_again_a_bijection_of_fixed_mins_code():
    """The spelling study's control: a byte token's only n-gram is itself, so its 55 spelling bits are its
    byte's own random bits, different for each of the 257 ids (<|endoftext|>: none, all 0). By themselves
    they are a bijection of the 9 bits of fixed_min, which the code carries as well: nothing else."""
    ids = torch.arange(257)
    bits = code_of(spelling_input(get_encoding("bytes")), ids, 64)
    assert torch.equal(bits[:, :9], bits_of(ids, 9))
    assert distinct_rows(bits[:, 9:]) and not bits[256, 9:].any()


def test_train_py_spells_a_new_model_from_its_dataset_and_it_samples_exports_and_serves(
        shakespeare_bytes, transformers, tmp_path, capsys):
    """train.py gives a new spelling model its dataset's tokens; the checkpoint carries the spelling, so
    sample.py, the Hugging Face export (model.py alone, no tokenizer.py) and serve.py give the same text."""
    import export_hf
    import train
    out_dir = tmp_path / "run"
    train.main([f"--dataset={shakespeare_bytes}", f"--out_dir={out_dir}", "--input_code=spelling", "--code_width=32",
                "--code_seed=4", *TINY_TRAINING, "--max_iters=3", "--eval_interval=3", "--lr_decay_iters=3"])
    ours = build_model(load_checkpoint(str(out_dir)))
    assert torch.equal(ours.embed.spelling, model.spell(token_bytes(get_encoding("bytes")), 32 - 9, seed=4))
    prompt, new = "ROMEO:", 12
    sampled = sample_greedy(capsys, out_dir, prompt, new)
    export_hf.export(str(out_dir), str(tmp_path / "hf_spelling"))
    theirs, tokenizer = load_export(transformers, tmp_path / "hf_spelling")
    check_export(ours, theirs, tokenizer, sampled, prompt, new)
    from test_serve import Server  # skipped without the openai client
    server = Server(str(out_dir))
    try:
        served = server.complete(prompt=prompt, max_tokens=new, temperature=0).choices[0].text
    finally:
        server.stop()
    assert sampled == prompt + served + "\n"


def test_a_spelling_model_needs_its_datasets_tokenizer_and_says_so_in_one_line(shakespeare_bytes, tmp_path, capsys):
    import train
    dataset = tmp_path / "renamed"
    dataset.mkdir()
    for name in ("train.bin", "val.bin"):
        os.symlink(os.path.join(shakespeare_bytes, name), dataset / name)
    with open(os.path.join(shakespeare_bytes, "meta.json")) as f:
        meta = json.load(f)
    (dataset / "meta.json").write_text(json.dumps({**meta, "encoding": "no_such_encoding"}))
    with pytest.raises(SystemExit):
        run_main(train.main, [f"--dataset={dataset}", f"--out_dir={tmp_path / 'run'}", *TINY_TRAINING,
                              "--input_code=spelling", "--code_width=32", "--max_iters=1"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: input_code=spelling is made from the byte strings")
    assert "no_such_encoding" in lines[0] and not (tmp_path / "run" / "ckpt.pt").exists()


def test_readme_input_table():
    """The README's trainable parameters at the paper config, and the fixed values each input holds."""
    settings = {"random_wide": dict(code_width=256), "spelling": dict(code_width=64)}
    with torch.device("meta"):
        counts = {name: GPT(GPTConfig(input_code=name, **settings.get(name, {}))).param_counts() for name in CODES}
    expected = {"fixed_min": (469_828_608, 0, 0), "affine": (469_828_608, 0, 272), "gray": (469_828_608, 0, 0),
                "permuted": (469_828_608, 0, 65_536), "random_wide": (469_828_608, 0, 16_777_216),
                "spelling": (469_828_608, 0, 3_145_728),
                "learned_lift": (469_844_992, 16_384, 0), "learned": (536_937_472, 67_108_864, 0),
                "frozen_random": (469_828_608, 0, 67_108_864)}
    for name, (trainable, input_trainable, fixed) in expected.items():
        assert (counts[name]["trainable"], counts[name]["input_trainable"], counts[name]["input_fixed_values"]) \
            == (trainable, input_trainable, fixed), name


# ------------------------------------------------------------------------------ old checkpoints, broken codes

def old_lift(ids, config):
    """The lift of the earlier model.py (K bits, affine-recoded or not, tiled), for checking old checkpoints."""
    K = code_bits(config.vocab_size)
    bits = (ids.unsqueeze(-1) >> torch.arange(K)) & 1
    values = (2 * bits - 1 if config.code_values == "bipolar" else bits).float() * config.code_scale
    return values.tile((-(-config.n_embd // K),))[..., :config.n_embd]


@pytest.mark.parametrize("name", ["fixed_min", "affine", "learned", "frozen_random"])
def test_checkpoints_without_the_new_fields_load_and_give_the_same_logits(name, tmp_path):
    config = tiny(name, code_values="binary", code_scale=0.5, code_seed=2)
    gpt = save_untrained(config, tmp_path / "run")
    checkpoint = load_checkpoint(str(tmp_path / "run"))
    for key in ("code_layout", "code_width"):  # what a checkpoint of the earlier model.py holds
        del checkpoint["model_args"][key]
    save_checkpoint(checkpoint, str(tmp_path / "old"))
    loaded = build_model(load_checkpoint(str(tmp_path / "old")))
    ids = torch.randint(0, 257, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded(ids)[0], gpt(ids)[0])
    assert loaded.state_dict().keys() == checkpoint["model"].keys()  # no new buffer is expected of it
    if name == "fixed_min":
        assert torch.equal(loaded.embed(ids), old_lift(ids, config))
    if name == "affine":
        A, b = loaded.embed.A.long(), loaded.embed.b.long()
        u = ((bits_of(ids.flatten(), 9) @ A.T + b) % 2 << torch.arange(9)).sum(1).view(ids.shape)
        assert torch.equal(loaded.embed(ids), old_lift(u, config))


def test_training_resumes_from_a_checkpoint_without_the_new_fields(shakespeare_bytes, tmp_path):
    import train
    out_dir = tmp_path / "run"
    common = [f"--dataset={shakespeare_bytes}", f"--out_dir={out_dir}", *TINY_TRAINING, "--lr_decay_iters=6"]
    train.main([*common, "--max_iters=3", "--eval_interval=3"])
    checkpoint = load_checkpoint(str(out_dir))
    for key in ("code_layout", "code_width"):
        del checkpoint["model_args"][key], checkpoint["config"][key]
    save_checkpoint(checkpoint, str(out_dir))
    train.main([*common, "--init_from=resume", "--max_iters=6", "--eval_interval=3"])
    assert load_checkpoint(str(out_dir))["iter_num"] == 6


def corrupt(state, key, change):
    return {**state, key: change(state[key].clone())}


def with_row(codebook, row, value):
    codebook[row] = value
    return codebook


@pytest.mark.parametrize("name,key,change,match", [
    ("permuted", "embed.perm", lambda p: torch.cat((p[:1], p[:-1])), "distinct"),
    ("permuted", "embed.perm", lambda p: p + 512, "distinct"),
    ("permuted", "embed.perm", lambda p: p[:100], "shape"),
    ("random_wide", "embed.codebook", lambda c: with_row(c, 1, c[0]), "same code"),
    ("random_wide", "embed.codebook", lambda c: with_row(c, 3, 2), "other than 0 and 1"),
    ("random_wide", "embed.codebook", lambda c: c[:, :9], "shape"),
    ("spelling", "embed.spelling", lambda s: with_row(s, 3, 2), "other than 0 and 1"),
    ("spelling", "embed.spelling", lambda s: s[:100], "shape"),
    ("affine", "embed.A", lambda A: torch.zeros_like(A), "distinct"),
    ("affine", "embed.A", lambda A: with_row(A, 0, A[1]), "distinct"),  # singular: two equal rows
])
def test_a_checkpoint_with_an_inconsistent_code_is_refused(name, key, change, match, tmp_path):
    """By every path that loads weights from a checkpoint: build_model (eval, sample, serve, export) and
    load_weights (train.py's resume)."""
    save_untrained(tiny(name), tmp_path / "run")
    checkpoint = load_checkpoint(str(tmp_path / "run"))
    checkpoint["model"] = corrupt(checkpoint["model"], key, change)
    save_checkpoint(checkpoint, str(tmp_path / "broken"))
    with pytest.raises(CheckpointError, match=match):
        build_model(load_checkpoint(str(tmp_path / "broken")))
    with pytest.raises(CheckpointError, match=match):
        load_weights(GPT(tiny(name)), checkpoint)


def test_a_checkpoint_of_a_code_this_process_does_not_know_is_one_line(monkeypatch, tmp_path, capsys):
    import eval as eval_py
    monkeypatch.setitem(CODES, "shifted", ShiftedCode)
    save_untrained(tiny("shifted"), tmp_path)
    monkeypatch.delitem(CODES, "shifted")  # as in a process that never registered it
    with pytest.raises(SystemExit):
        run_main(eval_py.main, [f"--out_dir={tmp_path}", "--device=cpu"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "input_code must be one of" in lines[0] and "got 'shifted'" in lines[0]


def test_a_checkpoint_missing_its_code_is_refused(tmp_path):
    save_untrained(tiny("permuted"), tmp_path / "run")
    checkpoint = load_checkpoint(str(tmp_path / "run"))
    del checkpoint["model"]["embed.perm"]
    save_checkpoint(checkpoint, str(tmp_path / "broken"))
    with pytest.raises(CheckpointError, match="embed.perm"):
        build_model(load_checkpoint(str(tmp_path / "broken")))


# ------------------------------------------------------------------------------ config

@pytest.mark.parametrize("bad,match", [
    (dict(input_code="learnt"), r"input_code must be one of 'fixed_min', .*'frozen_random', got 'learnt'$"),
    (dict(input_code="random_wide"), r"code_width must be above K = 9 bits .*got 0"),
    (dict(input_code="random_wide", code_width=9), r"code_width must be above K = 9"),
    (dict(input_code="random_wide", code_width=65), r"n_embd \(64\) must be at least the 65 code bits"),
    (dict(code_width=64), r"code_width applies to input_code 'random_wide', 'spelling' only, not 'fixed_min'"),
    (dict(input_code="spelling", code_width=9), r"code_width must be above K = 9"),
    (dict(code_layout="interleave"), r"code_layout must be one of 'tile', 'repeat', got 'interleave'"),
    (dict(input_code="learned", code_layout="repeat"),
     r"code_layout applies to input_code 'fixed_min', .* not 'learned'"),
    (dict(input_code="learned_lift", code_layout="repeat"), r"not 'learned_lift'"),
    (dict(n_embd=8, n_head=2), r"n_embd \(8\) must be at least the 9 code bits"),
    (dict(code_scale=0.0), r"code_scale must be finite and nonzero"),
    (dict(code_values="pm1"), r"code_values must be 'bipolar' or 'binary'"),
])
def test_config_errors_are_one_line_naming_the_choices(bad, match):
    with pytest.raises(ValueError, match=match) as error:
        GPTConfig(**{**dict(vocab_size=257, n_layer=1, n_head=4, n_embd=64), **bad})
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("bad,match", [("--input_code=learnt", "did you mean 'learned'"),
                                       ("--input_code=random_wide", "code_width must be above K = 9")])
def test_train_py_says_a_bad_code_setting_in_one_line(bad, match, shakespeare_bytes, tmp_path, capsys):
    import train
    with pytest.raises(SystemExit):
        run_main(train.main, [f"--dataset={shakespeare_bytes}", f"--out_dir={tmp_path}", *TINY_TRAINING, bad])
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and match in lines[0]
    assert "learnt" not in bad or all(repr(name) in lines[0] for name in CODES)  # a misspelt code: every choice named


def test_a_table_entry_that_is_not_an_input_code_is_named(monkeypatch):
    monkeypatch.setitem(CODES, "plain", torch.nn.Identity)
    with pytest.raises(ValueError, match=r"CODES\['plain'\] must be an nn.Module subclass of model.InputCode"):
        GPTConfig(input_code="plain")


def test_code_fields_say_so_in_their_metadata():
    assert code_fields() == ["input_code", "code_values", "code_scale", "code_seed", "code_layout", "code_width"]
    assert all(f.metadata.get("help") for f in fields(GPTConfig))
    for name in CODES:  # every field a code reads is a code field
        assert set(CODES[name].reads) <= set(code_fields())


def test_report_compares_a_layout_variant_with_its_learned_baseline():
    import report
    assert report.CODE_KEYS == set(code_fields())
    learned, repeat = [{"dir": "a"}], [{"dir": "b"}]
    variants = {("learned", (("code_layout", "tile"), ("n_layer", 2))): learned,
                ("fixed_min", (("code_layout", "repeat"), ("n_layer", 2))): repeat,
                ("fixed_min", (("code_layout", "repeat"), ("n_layer", 4))): repeat}
    assert report.learned_baseline(("fixed_min", (("code_layout", "repeat"), ("n_layer", 2))), variants) is learned
    assert report.learned_baseline(("fixed_min", (("code_layout", "repeat"), ("n_layer", 4))), variants) is None


# ------------------------------------------------------------------------------ a code from outside model.py

class ShiftedCode(BinaryCode):
    """A throwaway code for the test below: the K bits of t + 1 mod 2^K, a bijection model.py does not know."""

    def recode(self, idx):
        return (idx + 1) % (1 << self.K)


OFFSET = 3


class OffsetCode(BinaryCode):
    """Uses a name of this test file, which an exported model.py cannot have: export must refuse it."""

    def recode(self, idx):
        return (idx + OFFSET) % (1 << self.K)


def test_a_code_registered_from_outside_trains_evaluates_samples_and_exports(
        monkeypatch, shakespeare_bytes, transformers, tmp_path, capsys):
    import eval as eval_py
    import export_hf
    import train
    monkeypatch.setitem(CODES, "shifted", ShiftedCode)
    out_dir = tmp_path / "run"
    train.main([f"--dataset={shakespeare_bytes}", f"--out_dir={out_dir}", "--input_code=shifted",
                "--code_layout=repeat", *TINY_TRAINING, "--max_iters=6", "--eval_interval=6", "--lr_decay_iters=6"])
    eval_py.main([f"--out_dir={out_dir}", "--max_val_tokens=2048", "--device=cpu"])
    assert json.loads((out_dir / "eval.json").read_text())["input_code"] == "shifted"
    ours = build_model(load_checkpoint(str(out_dir)))
    assert isinstance(ours.embed, ShiftedCode) and ours.config.code_layout == "repeat"
    prompt, new = "ROMEO:", 12
    sampled = sample_greedy(capsys, out_dir, prompt, new)
    export_hf.main([f"--out_dir={out_dir}", f"--hf_dir={tmp_path / 'hf_shifted'}"])
    theirs, tokenizer = load_export(transformers, tmp_path / "hf_shifted")
    assert type(theirs.gpt.embed).__name__ == "ShiftedCode"
    check_export(ours, theirs, tokenizer, sampled, prompt, new)


def test_export_appends_what_model_py_lacks_and_refuses_a_code_that_cannot_run_there(monkeypatch, tmp_path):
    import export_hf
    monkeypatch.setitem(CODES, "gray_again", model.GrayCode)  # model.py's class under a name model.py lacks
    save_untrained(tiny("gray_again"), tmp_path / "gray_again")
    export_hf.export(str(tmp_path / "gray_again"), str(tmp_path / "hf_gray_again"))
    with open(tmp_path / "hf_gray_again" / "model.py") as f:
        assert f.read().endswith("CODES['gray_again'] = GrayCode\n")

    monkeypatch.setitem(CODES, "offset", OffsetCode)
    save_untrained(tiny("offset"), tmp_path / "offset")
    with pytest.raises(UserError, match="input code 'offset' does not run from the exported model.py .*NameError"):
        export_hf.export(str(tmp_path / "offset"), str(tmp_path / "hf_offset"))
    assert not (tmp_path / "hf_offset").exists()

"""model.py: the minimal and affine codes exhaustively over all ids, and the decoder's behaviour (the
contract every registered code meets, and the other codes, are in tests/test_codes.py)."""
import math

import pytest
import torch

from model import CODES, GPT, GPTConfig, code_bits, gf2_inverse, make_norm, rotary_tables, rotate
from tokenizer import get_encoding, token_bytes

V = 65536
ALL_IDS = torch.arange(V)


def small(**overrides):
    base = dict(vocab_size=257, block_size=32, n_layer=2, n_head=4, n_embd=64)
    return GPTConfig(**{**base, **overrides})


def bits_of(ids, K):  # (N,) -> (N, K) 0/1, LSB first
    return (ids[:, None] >> torch.arange(K)) & 1


def ids_of(bits):  # (N, K) 0/1 -> (N,)
    return (bits.long() << torch.arange(bits.size(1))).sum(1)


def paper_input(**settings):
    """GPT.embed of the paper's vocabulary and width, without the 65,536 x 1024 lm_head of a whole GPT."""
    config = GPTConfig(n_layer=1, **settings)
    return CODES[config.input_code](config)


def lift_bits(embed, ids):
    """The 0/1 code bits the lift puts on each channel, read back from its output values."""
    return (embed(ids) > 0).long()  # bit 1 is the larger value for both code_values (code_scale > 0)


@pytest.mark.parametrize("vocab_size,K", [(2, 1), (3, 2), (256, 8), (257, 9), (50257, 16), (65536, 16), (65537, 17)])
def test_code_bits(vocab_size, K):
    assert code_bits(vocab_size) == K
    assert 2 ** K >= vocab_size > 2 ** (K - 1) or K == 1


@pytest.mark.parametrize("code_values", ["bipolar", "binary"])
def test_fixed_code_is_the_tiled_binary_code_of_every_id(code_values):
    embed = paper_input(input_code="fixed_min", code_values=code_values, code_scale=0.5)
    out = embed(ALL_IDS)
    assert out.shape == (V, 1024) and out.dtype == torch.float32
    assert set(out.unique().tolist()) == ({-0.5, 0.5} if code_values == "bipolar" else {0.0, 0.5})
    bits = lift_bits(embed, ALL_IDS)
    assert torch.equal(bits.view(V, 64, 16), bits[:, None, :16].expand(V, 64, 16))  # channel j carries bit j mod 16
    assert torch.equal(ids_of(bits[:, :16]), ALL_IDS)  # the code decodes back: injective


def test_partial_last_tile_for_a_vocabulary_that_is_not_a_power_of_two():
    model = GPT(small(vocab_size=257, n_embd=64))
    ids = torch.arange(257)
    bits = lift_bits(model.embed, ids)
    for j in range(64):
        assert torch.equal(bits[:, j], bits[:, j % 9])
    assert torch.equal(ids_of(bits[:, :9]), ids)
    assert torch.equal(bits[:, 63], (ids >> 0) & 1)  # 63 = 7 * 9: the partial tile restarts at bit 0


def test_affine_code_is_A_c_xor_b_and_decodes_through_the_inverse():
    embed = paper_input(input_code="affine", code_seed=7)
    A, b = embed.A, embed.b
    assert A.dtype == b.dtype == torch.uint8 and A.shape == (16, 16) and b.shape == (16,)
    assert set(A.unique().tolist()) <= {0, 1}
    A_inv = gf2_inverse(A)
    assert A_inv is not None
    assert torch.equal((A.long() @ A_inv.long()) % 2, torch.eye(16, dtype=torch.long))
    code = lift_bits(embed, ALL_IDS)
    c = bits_of(ALL_IDS, 16)
    assert torch.equal(code[:, :16], (c @ A.long().T + b.long()) % 2)
    assert torch.equal(code.view(V, 64, 16), code[:, None, :16].expand(V, 64, 16))
    decoded = ((code[:, :16] - b.long()) % 2) @ A_inv.long().T % 2
    assert torch.equal(ids_of(decoded), ALL_IDS)


def test_gf2_inverse_detects_singular_matrices():
    singular = torch.tensor([[1, 0, 1], [0, 1, 1], [1, 1, 0]], dtype=torch.uint8)  # row 3 = row 1 + row 2
    assert gf2_inverse(singular) is None
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        M = torch.randint(0, 2, (6, 6), generator=g, dtype=torch.uint8)
        inv = gf2_inverse(M)
        if inv is not None:
            assert torch.equal((M.long() @ inv.long()) % 2, torch.eye(6, dtype=torch.long))
        else:  # singular: some nonzero x has M x = 0 over GF(2)
            xs = bits_of(torch.arange(1, 64), 6)
            assert bool(((xs @ M.long().T) % 2 == 0).all(1).any())


def test_state_dict_round_trip_restores_the_code():
    """A model's stored code wins over its own draw (checkpoint.py checks a loaded code: tests/test_codes.py)."""
    saved = GPT(small(input_code="affine", code_seed=1)).state_dict()
    fresh = GPT(small(input_code="affine", code_seed=2))
    assert not torch.equal(fresh.embed.A, saved["embed.A"])
    fresh.load_state_dict(saved)
    assert torch.equal(fresh.embed.A, saved["embed.A"]) and torch.equal(fresh.embed.b, saved["embed.b"])


@pytest.mark.parametrize("code_values", ["bipolar", "binary"])
def test_layernorm_pitfall_is_real(code_values):
    """Why the default is not LayerNorm: it maps id 0 and id 65535 (all bits equal) to the same input."""
    config = GPTConfig(n_layer=1, norm="layernorm", code_values=code_values)
    with torch.no_grad():  # what GPT builds as blocks[0].norm_1 and embed
        seen = make_norm(config)(CODES[config.input_code](config)(torch.tensor([0, 65535, 1])))
    assert torch.allclose(seen[0], seen[1])
    assert not torch.allclose(seen[0], seen[2])


def test_a_spelling_model_runs_only_with_a_spelling_given_or_loaded():
    """GPT(config) cannot know the tokenizer: its spelling is all 0 until set_token_bytes, and forward
    refuses it in one line, compiled too; a loaded state_dict brings its own and needs nothing more."""
    ids = torch.randint(0, 257, (2, 8), generator=torch.Generator().manual_seed(0))
    fresh = GPT(small(input_code="spelling", code_width=32)).eval()
    for model in (fresh, torch.compile(fresh, backend="eager")):
        with pytest.raises(ValueError, match=r"^input_code='spelling' has no spelling yet: .*set_token_bytes"):
            model(ids)
    fresh.embed.set_token_bytes(token_bytes(get_encoding("bytes")))
    with torch.no_grad():
        expected, _ = fresh(ids)
        loaded = GPT(small(input_code="spelling", code_width=32, code_seed=1)).eval()
        loaded.load_state_dict(fresh.state_dict())
        assert torch.equal(torch.compile(loaded, backend="eager", fullgraph=True)(ids)[0], expected)
    torch._dynamo.reset()


def test_initial_loss_on_random_ids_is_close_to_ln_V():
    torch.manual_seed(0)
    for input_code in ("fixed_min", "learned"):
        model = GPT(GPTConfig(n_layer=2, n_head=4, n_embd=256, block_size=64, input_code=input_code))
        ids = torch.randint(0, V, (2, 65))
        with torch.no_grad():
            _, loss = model(ids[:, :-1], ids[:, 1:])
        assert abs(loss.item() - math.log(V)) < 0.3


@pytest.mark.parametrize("bad,match", [(dict(input_code="learnt"), "input_code"),
                                       (dict(code_values="pm1"), "code_values"),
                                       (dict(n_head=5), "multiple"), (dict(vocab_size=1), "vocab_size"),
                                       (dict(n_layer=0), "n_layer"), (dict(dropout=1.0), "dropout"),
                                       (dict(dropout=float("nan")), "dropout"), (dict(rope_theta=0.0), "rope_theta"),
                                       (dict(code_seed=-1), "code_seed")])
def test_config_errors_name_the_problem(bad, match):
    with pytest.raises(ValueError, match=match):
        small(**bad)


def test_the_same_seed_gives_every_input_code_the_same_decoder():
    """Paired seeds: runs of different codes with one seed differ in their input only, so their loss
    difference is the input's, not the luck of the decoder's draw."""
    from test_codes import code_settings
    shared = {}
    for code in CODES:
        torch.manual_seed(5)
        model = GPT(GPTConfig(vocab_size=257, n_layer=2, n_head=4, n_embd=64, block_size=32,
                              **code_settings(code, 257)))
        shared[code] = {k: v for k, v in model.state_dict().items() if not k.startswith("embed.")}
    reference = shared["fixed_min"]
    for code, weights in shared.items():
        assert weights.keys() == reference.keys(), code
        assert all(torch.equal(weights[k], reference[k]) for k in reference), code
    torch.manual_seed(6)
    other = GPT(GPTConfig(vocab_size=257, n_layer=2, n_head=4, n_embd=64, block_size=32))
    assert not torch.equal(other.lm_head.weight, reference["lm_head.weight"])  # and the seed does matter


def test_rotary_turns_each_pair_of_q_and_k_by_its_angle_and_attention_sees_only_relative_positions():
    config = small()
    cos, sin = rotary_tables(config)
    assert cos.shape == sin.shape == (32, 16)  # (block_size, head_size)
    x = torch.randn(3, 4, 32, 16, dtype=torch.float64)  # (B, heads, T, head_size)
    x1, x2 = x.chunk(2, dim=-1)
    frequency = 10000.0 ** -(torch.arange(0, 16, 2, dtype=torch.float64) / 16)
    angle = torch.arange(32, dtype=torch.float64)[:, None] * frequency
    textbook = torch.cat((x1 * angle.cos() - x2 * angle.sin(), x2 * angle.cos() + x1 * angle.sin()), dim=-1)
    assert torch.allclose(rotate(x, cos.double(), sin.double()), textbook, atol=1e-6)  # the tables are float32
    q, k = torch.randn(2, 16, dtype=torch.float64)
    rotated_q = rotate(q.expand(32, 16), cos.double(), sin.double())
    rotated_k = rotate(k.expand(32, 16), cos.double(), sin.double())
    scores = [rotated_q[i] @ rotated_k[j] for i, j in ((5, 2), (25, 22), (3, 3), (30, 30))]
    assert scores[0] == pytest.approx(scores[1], abs=1e-5) and scores[2] == pytest.approx(scores[3], abs=1e-5)
    assert rotate(x.bfloat16(), cos, sin).dtype == torch.bfloat16  # autocast's dtype is kept


def test_a_compiled_training_step_has_no_graph_break_and_the_eager_gradients():
    """torch.compile traces the forward and backward (AOTAutograd, without inductor's code generation)
    as one graph, with the eager gradients."""
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    model = GPT(small())
    ids = torch.randint(0, 257, (2, 32), generator=torch.Generator().manual_seed(0))
    _, loss = model(ids, ids)
    loss.backward()
    eager = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    _, compiled_loss = torch.compile(model, backend="aot_eager")(ids, ids)
    compiled_loss.backward()
    assert sum(counters["graph_break"].values()) == 0 and counters["stats"]["unique_graphs"] == 1
    assert compiled_loss.item() == pytest.approx(loss.item(), abs=1e-5)
    assert all(torch.allclose(p.grad, g, atol=1e-6) for p, g in zip(model.parameters(), eager))
    torch._dynamo.reset()

"""
A GPT decoder whose input embedding table can be replaced by fixed minimal binary token codes.

The paper's idea is the class BinaryCode: a token id t in a vocabulary of V needs only
K = ceil(log2 V) bits, so the model's input is t's K-bit code (LSB first), spread over the width,
with zero trainable parameters and no V x n_embd table. `input_code` picks the input interface,
`GPT.embed`, from the table CODES below: it is the place to add your own code. A code is a *recode*
(a fixed bijection on K-bit ids, or a fixed codebook) followed by the shared *lift* (bits to values
{-1, +1} or {0, 1} times code_scale, then to channels by code_layout 'tile' or 'repeat'):
  fixed_min      the code itself
  affine         the code recoded by a fixed random invertible affine map over GF(2): c~ = A c xor b
  gray           the reflected Gray code of the id, t xor (t >> 1)
  permuted       the code of a random permutation of the ids (non-linear: no XOR structure kept)
  random_wide    random collision-free codes of code_width > K bits (fixed but not minimal)
  spelling       the code followed by bits of the token's spelling: a hash of its bytes' n-grams
  learned_lift   the code through a trainable K x n_embd linear map instead of the fixed lift
  learned        the usual trainable nn.Embedding(V, n_embd): the baseline
  frozen_random  a frozen Gaussian V x n_embd table: fixed, but not minimal (an ablation)
To add one, write a small class (usually a BinaryCode subclass overriding recode or bits) and give it
a name in CODES; validation, the CLI, checkpoints, report.py, the HF export and the contract tests in
tests/test_codes.py pick it up from there.

Everything else is shared and matched: pre-norm blocks, rotary position embeddings on q and k,
causal attention through F.scaled_dot_product_attention, a GELU MLP of 4x width, a final norm and
an untied trainable lm_head. No bias, no positional table, GPT-2 style init.

Why the defaults are RMSNorm and bipolar {-1, +1} codes: a pre-norm block reads norm(x), and
LayerNorm subtracts the mean, which sends every constant vector to one point: id 0 (all bits 0) and
id 65535 (all bits 1, our <|endoftext|>) would look the same to the first block, with {0,1} codes
and with {-1,+1} codes alike. RMSNorm only rescales, and every bipolar code has RMS exactly
code_scale, so the first block reads the codes unchanged (tests/test_codes.py checks all ids).

This file imports only torch: export_hf.py ships it, as it is, inside every exported model folder.
"""
import math
from dataclasses import dataclass, field, fields

import torch
import torch.nn as nn
import torch.nn.functional as F


# ------------------------------------------------------------------------------- configuration

def code_field(default, help):
    return field(default=default, metadata={"help": help, "code": True})


@dataclass
class GPTConfig:
    """The model's settings, each checked here (the one place): a bad value is a one-line ValueError."""
    vocab_size: int = field(default=65536,
                            metadata={"help": "V, the number of token ids (from the dataset's meta.json)"})
    block_size: int = field(default=1024, metadata={"help": "context length in tokens"})
    n_layer: int = field(default=32, metadata={"help": "transformer blocks"})
    n_head: int = field(default=32, metadata={"help": "attention heads; n_embd / n_head must be even (rotary)"})
    n_embd: int = field(default=1024, metadata={"help": "model width"})
    input_code: str = code_field("fixed_min", "the input interface, a name in model.CODES (fixed_min: the paper's "
                                              "code; learned: the usual table)")
    code_values: str = code_field("bipolar", "what a code bit becomes: 'bipolar' {-1, +1} or 'binary' {0, 1}")
    code_scale: float = code_field(1.0, "the code's values are multiplied by this (finite, nonzero)")
    code_seed: int = code_field(0, "draws the random codes (of the input codes that read it, e.g. affine)")
    code_layout: str = code_field("tile", "code bits to channels: 'tile' (channel j carries bit j mod W) or "
                                          "'repeat' (bit floor(j W / n_embd))")
    code_width: int = code_field(0, "bits per code of the input codes that read it (random_wide, spelling): above "
                                    "K = ceil(log2 V), e.g. 64 or 256; 0 for the others")
    norm: str = field(default="rmsnorm",
                      metadata={"help": "'rmsnorm' or 'layernorm' (model.py says why not LayerNorm)"})
    bias: bool = field(default=False, metadata={"help": "biases in the linear layers and LayerNorm"})
    dropout: float = field(default=0.0, metadata={"help": "dropout probability"})
    rope_theta: float = field(default=10000.0, metadata={"help": "rotary embedding base"})

    def __post_init__(self):
        # n_layer >= 1: a GPT is a decoder; an input code alone is built from its class (CODES[name](config)).
        require(self.input_code in CODES, f"input_code must be one of {quoted(CODES)}, got {self.input_code!r}")
        code = CODES[self.input_code]
        require(isinstance(code, type) and issubclass(code, InputCode) and issubclass(code, nn.Module),
                f"CODES[{self.input_code!r}] must be an nn.Module subclass of model.InputCode, got {code!r}")
        require(self.code_values in ("bipolar", "binary"),
                f"code_values must be 'bipolar' or 'binary', got {self.code_values!r}")
        require(self.code_layout in LAYOUTS, f"code_layout must be one of {quoted(LAYOUTS)}, got {self.code_layout!r}")
        require(math.isfinite(self.code_scale) and self.code_scale != 0,
                f"code_scale must be finite and nonzero, got {self.code_scale}")
        require(0 <= self.code_seed < 2 ** 64,
                f"code_seed must be a whole number from 0 to 2^64 - 1, got {self.code_seed}")
        require(self.norm in ("rmsnorm", "layernorm"), f"norm must be 'rmsnorm' or 'layernorm', got {self.norm!r}")
        require(self.vocab_size >= 2, f"vocab_size must be at least 2, got {self.vocab_size}")
        require(min(self.block_size, self.n_layer, self.n_head, self.n_embd) >= 1,
                "block_size, n_layer, n_head and n_embd must be at least 1")
        require(self.n_embd % self.n_head == 0, f"n_embd ({self.n_embd}) must be a multiple of n_head ({self.n_head})")
        require((self.n_embd // self.n_head) % 2 == 0, "the head size n_embd/n_head must be even for rotary embeddings")
        require(0 <= self.dropout < 1, f"dropout must be in [0, 1), got {self.dropout}")
        require(math.isfinite(self.rope_theta) and self.rope_theta > 0,
                f"rope_theta must be above 0, got {self.rope_theta}")
        for name in ("code_layout", "code_width"):  # a setting the code ignores would be a silent no-op
            users = [other for other, cls in CODES.items() if name in cls.reads]
            require(getattr(self, name) == GPTConfig.__dataclass_fields__[name].default or name in code.reads,
                    f"{name} applies to input_code {quoted(users)} only, not {self.input_code!r}")
        code.check(self)


def require(ok, message):
    if not ok:
        raise ValueError(message)


def quoted(names):
    return ", ".join(repr(name) for name in names)


def code_fields():
    """The GPTConfig fields that set the input code (metadata 'code'): what a variant may differ in from
    its baseline."""
    return [f.name for f in fields(GPTConfig) if f.metadata.get("code")]


# --------------------------------------------------------------------------- the binary code

def code_bits(vocab_size):
    """K = ceil(log2 V), the fewest bits that give every id its own code (at least 1)."""
    return max(1, (vocab_size - 1).bit_length())


# code_layout: how (..., W) code values fill n_embd channels. Both put every bit on at least one channel
# when n_embd >= W (GPTConfig checks it), so distinct codes stay distinct. Both are copies, no arithmetic.

def tile(values, n_embd):
    """Channel j carries bit j mod W: the code again and again, the last copy partial if W does not divide n_embd."""
    return values.tile((-(-n_embd // values.size(-1)),))[..., :n_embd]


def repeat(values, n_embd):
    """Channel j carries bit floor(j W / n_embd): W contiguous runs in bit order, repeat_interleave(n_embd / W)
    when W divides n_embd (the author's checkpoints); otherwise runs of floor(n_embd / W) and ceil(n_embd / W)
    channels, the longer ones spread evenly over the bits."""
    width = values.size(-1)
    if n_embd % width == 0:
        return values.repeat_interleave(n_embd // width, dim=-1)
    channel_bit = torch.arange(n_embd, device=values.device) * width // n_embd
    return values.index_select(-1, channel_bit)  # a gather, slower: only for uneven runs


LAYOUTS = {"tile": tile, "repeat": repeat}


class InputCode:
    """What CODES needs of an entry, besides being an nn.Module that cls(config) builds into GPT.embed
    and whose forward maps (B, T) int64 ids to (B, T, n_embd) float32 vectors."""
    reads = ()  # the GPTConfig code fields it uses: a code_layout or code_width it does not use is refused
    # True: made from the tokens' byte strings, which a new model is given by set_token_bytes(token_bytes),
    # token_bytes[t] the bytes of id t (train.py does it; a loaded model has its code from the checkpoint)
    needs_token_bytes = False

    @staticmethod
    def trainable_params(config):
        """Trainable parameters of the input interface (tests/test_codes.py checks every code against it)."""
        return 0

    @classmethod
    def check(cls, config):
        """Raise ValueError (one line, naming what is allowed) for settings this code cannot take."""


class ChannelLayout(nn.Module):
    """The shared lift's last step: (..., W) code values -> (..., n_embd) channels, by code_layout."""

    def __init__(self, config):
        super().__init__()
        self.layout, self.n_embd = config.code_layout, config.n_embd

    def forward(self, values):
        return LAYOUTS[self.layout](values, self.n_embd)

    def extra_repr(self):
        return f"{self.layout}, n_embd={self.n_embd}"


class BinaryCode(InputCode, nn.Module):
    """fixed_min, the paper's code, and the base of every lifted code: id t -> `width` code bits ->
    values -> channels. Bit k of t is (t >> k) & 1, LSB first, after recode (a fixed bijection on K-bit
    ids: identity here). The lift maps bit 1 to +code_scale and bit 0 to -code_scale ('bipolar') or 0
    ('binary'), then lays them out on n_embd channels (make_lift). A subclass overrides recode (the K
    bits of another id), bits (a codebook of its own width) or make_lift."""
    reads = ("code_values", "code_scale", "code_layout")

    @classmethod
    def width(cls, config):
        """Code bits per id, before the lift."""
        return code_bits(config.vocab_size)

    @classmethod
    def check(cls, config):
        if config.n_embd < cls.width(config):
            raise ValueError(f"n_embd ({config.n_embd}) must be at least the {cls.width(config)} code bits of "
                             f"input_code={config.input_code!r}: with fewer channels some bit is lost and ids collide")

    def __init__(self, config):
        super().__init__()
        self.K = code_bits(config.vocab_size)
        self.bipolar = config.code_values == "bipolar"
        self.scale = config.code_scale
        self.register_buffer("bit_shift", torch.arange(self.K), persistent=False)
        self.lift = self.make_lift(config)

    def make_lift(self, config):
        return ChannelLayout(config)

    def recode(self, idx):
        return idx

    def bits(self, idx):  # (B, T) int64 -> (B, T, width) 0/1
        return (self.recode(idx).unsqueeze(-1) >> self.bit_shift) & 1

    def forward(self, idx):  # (B, T) int64 -> (B, T, n_embd) float32
        bits = self.bits(idx).float()
        return self.lift((2 * bits - 1 if self.bipolar else bits) * self.scale)


# ---------------------------------------------------------------------------- the other codes
# The random codes are drawn on a CPU generator, so every machine (and a meta-device build) draws the
# same ones; they are persistent buffers all the same, because a torch upgrade may change a sampler:
# a checkpoint carries its own code, and loading never re-draws it (checkpoint.py checks what it loads).

def gf2_inverse(A):
    """Inverse of a square 0/1 matrix over GF(2) by Gauss-Jordan elimination, or None if it is singular."""
    K = A.shape[0]
    rows = [[int(v) for v in row] + [int(i == j) for j in range(K)] for i, row in enumerate(A.tolist())]
    for col in range(K):
        pivot = next((r for r in range(col, K) if rows[r][col]), None)
        if pivot is None:
            return None
        rows[col], rows[pivot] = rows[pivot], rows[col]
        for r in range(K):
            if r != col and rows[r][col]:
                rows[r] = [x ^ y for x, y in zip(rows[r], rows[col])]
    return torch.tensor([row[K:] for row in rows], dtype=torch.uint8)


def draw_affine(K, seed):
    """A in GL(K, 2) and b in {0,1}^K."""
    g = torch.Generator().manual_seed(seed)
    while True:  # a random 0/1 matrix is invertible with probability about 0.29
        A = torch.randint(0, 2, (K, K), generator=g, dtype=torch.uint8, device="cpu")
        if gf2_inverse(A) is not None:
            return A, torch.randint(0, 2, (K,), generator=g, dtype=torch.uint8, device="cpu")


class AffineCode(BinaryCode):
    """affine: the K bits of t recoded by c~ = A c xor b over GF(2), A invertible, both drawn from
    code_seed and stored as uint8 buffers A (K x K) and b (K). On ids this is u = b xor the XOR of the
    columns of A picked by t's set bits."""
    reads = BinaryCode.reads + ("code_seed",)

    def __init__(self, config):
        super().__init__(config)
        A, b = draw_affine(self.K, config.code_seed)
        self.register_buffer("A", A)
        self.register_buffer("b", b)

    def recode(self, idx):
        columns = (self.A.long() << self.bit_shift[:, None]).sum(0)  # column j of A as an integer
        u = (self.b.long() << self.bit_shift).sum()
        for j in range(self.K):
            u = u ^ (((idx >> j) & 1) * columns[j])
        return u


class GrayCode(BinaryCode):
    """gray: the K bits of t's reflected Gray code, t xor (t >> 1); consecutive ids differ in one bit."""

    def recode(self, idx):
        return idx ^ (idx >> 1)


class PermutedCode(BinaryCode):
    """permuted: the K bits of perm[t], perm the first V entries of a random permutation of the 2^K
    K-bit ids drawn from code_seed and stored as the int64 buffer perm (V). Unlike affine it keeps no
    XOR structure: an arbitrary fixed bijection."""
    reads = BinaryCode.reads + ("code_seed",)

    def __init__(self, config):
        super().__init__(config)
        g = torch.Generator().manual_seed(config.code_seed)
        self.register_buffer("perm", torch.randperm(2 ** self.K, generator=g, device="cpu")[:config.vocab_size])

    def recode(self, idx):
        return self.perm[idx]


def repeated_rows(rows):
    """(N,) bool: True for every row equal to an earlier one."""
    _, inverse = torch.unique(rows, dim=0, return_inverse=True)
    order = torch.arange(len(rows), device=rows.device)
    first = torch.full((len(rows),), len(rows), device=rows.device).scatter_reduce(0, inverse, order, "amin")
    return first[inverse] != order


def draw_wide_codes(V, width, seed):
    """(V, width) uint8 0/1 rows, all distinct: uniform bits, a repeated row drawn again until none is left."""
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2, (V, width), generator=g, dtype=torch.uint8, device="cpu")
    while (repeated := repeated_rows(codes)).any():
        codes[repeated] = torch.randint(0, 2, (int(repeated.sum()), width), generator=g, dtype=torch.uint8,
                                        device="cpu")
    return codes


class WideCode(BinaryCode):
    """The base of the codes of code_width bits per id, more than the K an id needs (random_wide, spelling)."""
    reads = BinaryCode.reads + ("code_seed", "code_width")

    @classmethod
    def width(cls, config):
        return config.code_width

    @classmethod
    def check(cls, config):
        K = code_bits(config.vocab_size)
        if config.code_width <= K:
            raise ValueError(f"code_width must be above K = {K} bits (vocab_size {config.vocab_size}) for "
                             f"input_code={config.input_code!r}, e.g. 64 or 256; got {config.code_width}")
        super().check(config)


class RandomWideCode(WideCode):
    """random_wide: t's row of a random codebook of V distinct code_width-bit codes (code_width > K),
    drawn from code_seed and stored as the uint8 buffer codebook (V x code_width): the frozen
    non-minimal codes of the paper's earlier ablations (64 and 256 bits). The lift is shared."""

    def __init__(self, config):
        super().__init__(config)
        self.register_buffer("codebook", draw_wide_codes(config.vocab_size, config.code_width, config.code_seed))

    def bits(self, idx):
        return self.codebook[idx]


WORD_START = 256  # the symbol a token's leading space becomes: ' word' is spelt [WORD_START] w o r d
NGRAM_ORDERS = (1, 2, 3)


def ngram_keys(piece):
    """A distinct integer for each n-gram of a token's bytes (n = 1, 2, 3; one per occurrence), with
    a leading space read as the word-start mark: the symbols 0..256 are the digits 1..257 of a base-258 number."""
    symbols = [WORD_START, *piece[1:]] if piece[:1] == b" " else list(piece)
    return [sum((s + 1) * 258 ** i for i, s in enumerate(symbols[start:start + n]))
            for n in NGRAM_ORDERS for start in range(len(symbols) - n + 1)]


def spell(token_bytes, width, seed):
    """(V, width) uint8 0/1: bit i of token t is 1 where sum_g r_g[i] > 0, the sum over t's n-grams g (with
    repeats) of a fixed N(0, 1) vector r_g per distinct n-gram, drawn from seed in the n-grams' key order
    (so r_g depends on the other n-grams of the vocabulary too: the stored result is the code, not the seed).
    This is SimHash (Charikar, 2002) of t's n-gram counts: two tokens' bits agree with probability
    1 - angle / pi between their count vectors (' word' and 'word': 9 n-grams shared of 12, 5 bits in 6).
    A token without bytes (<|endoftext|>) has the sum 0: all bits 0."""
    keys, owners = [], []
    for t, piece in enumerate(token_bytes):
        grams = ngram_keys(piece)
        keys += grams
        owners += [t] * len(grams)
    grams, which = torch.unique(torch.tensor(keys, dtype=torch.int64), return_inverse=True)
    directions = torch.randn(len(grams), width, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    sums = torch.zeros(len(token_bytes), width, dtype=torch.float64)
    sums.index_add_(0, torch.tensor(owners, dtype=torch.int64), directions[which])
    return (sums > 0).to(torch.uint8)


class SpellingCode(WideCode):
    """spelling: t's K-bit code (fixed_min's bits, which keep every id distinct) followed by code_width - K
    bits of its spelling, spell(): the SimHash of the 1-, 2- and 3-grams of t's bytes, a leading space
    read as a word-start mark. A BPE id's bits say nothing of how the token is written, while a trained
    table learns it (' word' and 'word' end up close): this code is a fixed input, with no trainable
    parameter, that carries the spelling. On bytes a token's spelling is its byte's own random bits,
    the byte again: the code holds what fixed_min holds.
    The spelling follows from the tokenizer's byte strings, which model.py does not read: a new model
    starts with none (all 0), which forward refuses, and is given them by set_token_bytes (train.py does
    it from the dataset's encoding). It is stored as the uint8 buffer spelling (V x (code_width - K)), so
    a checkpoint loads without the tokenizer. code_width bits per token; V (code_width - K) stored bits,
    at code_width 64 212,992 for cl100k_4096 and 3,145,728 for the 65,536 ids of cl100k_65536."""
    needs_token_bytes = True

    def __init__(self, config):
        super().__init__(config)
        self.seed = config.code_seed
        self.register_buffer("spelling", torch.zeros(config.vocab_size, config.code_width - self.K, dtype=torch.uint8))
        self.spelt = False  # known to hold a spelling: from set_token_bytes, a loaded state_dict or check_spelt
        self.register_load_state_dict_post_hook(SpellingCode.loaded)

    def set_token_bytes(self, token_bytes):
        if len(token_bytes) != self.spelling.size(0):
            raise ValueError(f"the tokenizer has {len(token_bytes)} tokens but the model's vocab_size is "
                             f"{self.spelling.size(0)}")
        self.spelling.copy_(spell(token_bytes, self.spelling.size(1), self.seed))
        self.spelt = True

    def loaded(self, incompatible_keys):  # checked here, so that a compiled loaded model never runs check_spelt
        self.spelt = not self.spelling.is_meta and bool(self.spelling.any())

    @torch.compiler.disable  # a check of the data, once per model: compiled code runs it eagerly, outside the graph
    def check_spelt(self):
        """A loaded model holds its checkpoint's spelling; a new one holds zeros until set_token_bytes."""
        self.spelt = bool(self.spelling.any())
        if not self.spelt:
            raise ValueError("input_code='spelling' has no spelling yet: give a new model its tokenizer's bytes "
                             "with model.embed.set_token_bytes(tokenizer.token_bytes(encoding)), as train.py does")

    def bits(self, idx):
        if not self.spelt:
            self.check_spelt()
        return torch.cat((super().bits(idx), self.spelling[idx].long()), dim=-1)


class LearnedLift(BinaryCode):
    """learned_lift: the minimal code's values through a trainable K x n_embd linear map (embed.lift,
    no bias) in place of the fixed layout. The input is trainable but not a table: K * n_embd
    parameters against V * n_embd."""
    reads = ("code_values", "code_scale")

    @staticmethod
    def trainable_params(config):
        return code_bits(config.vocab_size) * config.n_embd

    def make_lift(self, config):
        return nn.Linear(self.K, config.n_embd, bias=False)  # GPT's init: N(0, 0.02), as the table's rows


class LearnedTable(InputCode, nn.Embedding):
    """learned: the usual trainable V x n_embd table, the baseline."""

    @staticmethod
    def trainable_params(config):
        return config.vocab_size * config.n_embd

    def __init__(self, config):
        super().__init__(config.vocab_size, config.n_embd)


class FrozenRandomTable(InputCode, nn.Module):
    """frozen_random: a fixed, non-minimal code: a frozen N(0, 1) V x n_embd table (times code_scale),
    drawn from code_seed."""
    reads = ("code_scale", "code_seed")

    def __init__(self, config):
        super().__init__()
        g = torch.Generator().manual_seed(config.code_seed)
        table = torch.randn(config.vocab_size, config.n_embd, generator=g, device="cpu")
        self.register_buffer("table", config.code_scale * table)

    def forward(self, idx):
        return F.embedding(idx, self.table)


# The input codes by name: add yours here (or, from outside this file, CODES["name"] = YourClass).
CODES = {
    "fixed_min": BinaryCode,
    "affine": AffineCode,
    "gray": GrayCode,
    "permuted": PermutedCode,
    "random_wide": RandomWideCode,
    "spelling": SpellingCode,
    "learned_lift": LearnedLift,
    "learned": LearnedTable,
    "frozen_random": FrozenRandomTable,
}
BASELINE_CODE = "learned"  # what report.py compares every code to


# ------------------------------------------------------------------------------------ the decoder

def rotary_tables(config):
    """cos and sin of the rotary angles, each (block_size, head_size): position p turns the channel
    pair (i, i + head_size/2) by p * rope_theta^(-2i / head_size), so both halves hold the same angles."""
    head_size = config.n_embd // config.n_head
    inv_freq = config.rope_theta ** -(torch.arange(0, head_size, 2, dtype=torch.float32) / head_size)
    angles = torch.outer(torch.arange(config.block_size, dtype=torch.float32), inv_freq).repeat(1, 2)
    return angles.cos(), angles.sin()


def rotate(x, cos, sin):
    """Rotary position embedding (RoFormer): x (..., T, head_size) with each pair (x1, x2) = (i, i +
    head_size/2) turned by its position's angle, (x1 cos - x2 sin, x2 cos + x1 sin)."""
    x1, x2 = x.chunk(2, dim=-1)
    return (x * cos + torch.cat((-x2, x1), dim=-1) * sin).type_as(x)  # the tables are float32; x may be bf16


class CausalSelfAttention(nn.Module):
    def __init__(self, config, layer):
        super().__init__()
        self.layer = layer  # which of the cache's layers holds this one's keys and values
        self.n_head = config.n_head
        self.dropout = config.dropout
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x, cos, sin, kv_cache=None):
        B, T, C = x.shape
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in self.c_attn(x).split(C, dim=2))
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)  # (B, nh, T, hs)
        mask, causal = None, True
        if kv_cache is not None:
            k, v, mask, causal = kv_cache.update(self.layer, k, v)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.resid_dropout(self.c_proj(y.transpose(1, 2).reshape(B, T, C)))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x))))


def make_norm(config):
    if config.norm == "rmsnorm":
        return nn.RMSNorm(config.n_embd)
    return nn.LayerNorm(config.n_embd, bias=config.bias)


class Block(nn.Module):
    def __init__(self, config, layer):
        super().__init__()
        self.norm_1 = make_norm(config)
        self.attn = CausalSelfAttention(config, layer)
        self.norm_2 = make_norm(config)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, kv_cache=None):
        x = x + self.attn(self.norm_1(x), cos, sin, kv_cache)
        return x + self.mlp(self.norm_2(x))


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        # Paired seeds: the weights are drawn from a copy of the caller's RNG state taken before any
        # module is built, the shared ones first, so every input code gets the same decoder from the
        # same seed (modules also draw when they are constructed, and a table draws far more).
        init_rng = torch.Generator().set_state(torch.get_rng_state())
        self.config = config
        self.embed = CODES[config.input_code](config)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config, layer) for layer in range(config.n_layer))
        self.norm_f = make_norm(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        cos, sin = rotary_tables(config)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        for part in (self.blocks, self.norm_f, self.lm_head, self.embed):
            for name, module in part.named_modules():
                self._init_weights(module, name, init_rng)

    def _init_weights(self, module, name, generator):
        """GPT-2's init: N(0, 0.02) for every matrix, the residual projections (c_proj) scaled by
        1/sqrt(2 n_layer), zero biases; norms keep their ones."""
        if isinstance(module, (nn.Linear, nn.Embedding)):
            std = 0.02 / math.sqrt(2 * self.config.n_layer) if name.endswith("c_proj") else 0.02
            nn.init.normal_(module.weight, mean=0.0, std=std, generator=generator)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, idx, targets=None, kv_cache=None, lengths=None):
        """idx (B, T) ids -> (logits, loss). With targets: the logits of every position and the mean
        cross-entropy. Without: the logits of every position (B, T, V), or, given the real lengths (B,)
        of rows padded on the right, of each row's last real token only (B, 1, V), all that engine.py's
        prefill reads. kv_cache: engine.py's KVCache, whose begin, update and advance give a cached
        forward its positions, keys and attention mask (engine.py says how)."""
        B, T = idx.shape
        if kv_cache is None and T > self.config.block_size:
            raise ValueError(f"sequence of {T} tokens is longer than block_size {self.config.block_size}")
        positions = kv_cache.begin(B, T, idx.device) if kv_cache is not None else 0
        if isinstance(positions, int):
            cos, sin = self.rope_cos[positions:positions + T], self.rope_sin[positions:positions + T]
        else:  # each row at its own positions: (B, 1, T, hs), broadcast over the heads
            cos, sin = self.rope_cos[positions].unsqueeze(1), self.rope_sin[positions].unsqueeze(1)
        x = self.drop(self.embed(idx).to(self.lm_head.weight.dtype))  # the codes are float32; weights may be bf16
        for block in self.blocks:
            x = block(x, cos, sin, kv_cache)
        if kv_cache is not None:
            kv_cache.advance(B, T)
        x = self.norm_f(x)
        if targets is None:
            if lengths is not None:
                x = x[torch.arange(B, device=x.device), lengths - 1].unsqueeze(1)
            return self.lm_head(x), None
        logits = self.lm_head(x)
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        return logits, loss

    def param_counts(self):
        """Trainable parameters in all and in the input interface, and the fixed values the input holds."""
        return {
            "trainable": sum(p.numel() for p in self.parameters() if p.requires_grad),
            "input_trainable": sum(p.numel() for p in self.embed.parameters() if p.requires_grad),
            "input_fixed_values": sum(b.numel() for name, b in self.embed.named_buffers()
                                      if name in self.embed.state_dict()),
        }

    def flops_per_token(self):
        """Training FLOPs per token (forward + backward), as in the PaLM paper's appendix B: 6 per
        weight of every matmul (the input lift or table lookup does none, so all codes cost the same;
        learned_lift's small K x n_embd map is left out too) plus 12 * n_layer * n_embd * block_size
        for attention scores and values over the full T x T square. A causal flash kernel skips most
        of the masked half, so an MFU from this count reads above what the GPU executes, by about half
        attention's share of the count."""
        counts = self.param_counts()
        cfg = self.config
        return 6 * (counts["trainable"] - counts["input_trainable"]) + 12 * cfg.n_layer * cfg.n_embd * cfg.block_size

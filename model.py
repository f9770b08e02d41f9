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
"""
import difflib
import math
from dataclasses import dataclass, field, fields

import torch
import torch.nn as nn
import torch.nn.functional as F


# ------------------------------------------------------------------------------- input codes

def code_bits(vocab_size):
    """K = ceil(log2 V), the fewest bits that give every id its own code (at least 1)."""
    return max(1, (vocab_size - 1).bit_length())


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


# The random codes are drawn on a CPU generator, so every machine (and a meta-device build) draws the
# same ones; they are persistent buffers all the same, because a torch upgrade may change a sampler:
# a checkpoint carries its own code, and loading never re-draws it.

def draw_affine(K, seed):
    """A in GL(K, 2) and b in {0,1}^K."""
    g = torch.Generator().manual_seed(seed)
    while True:  # a random 0/1 matrix is invertible with probability about 0.29
        A = torch.randint(0, 2, (K, K), generator=g, dtype=torch.uint8, device="cpu")
        if gf2_inverse(A) is not None:
            return A, torch.randint(0, 2, (K,), generator=g, dtype=torch.uint8, device="cpu")


def first_duplicates(rows):
    """(N,) bool: True for every row equal to an earlier one."""
    _, inverse = torch.unique(rows, dim=0, return_inverse=True)
    order = torch.arange(len(rows), device=rows.device)
    first = torch.full((len(rows),), len(rows), device=rows.device).scatter_reduce(0, inverse, order, "amin")
    return first[inverse] != order


def draw_wide_codes(V, width, seed):
    """(V, width) uint8 0/1 rows, all distinct: uniform bits, a repeated row drawn again until none is left."""
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2, (V, width), generator=g, dtype=torch.uint8, device="cpu")
    while (repeated := first_duplicates(codes)).any():
        codes[repeated] = torch.randint(0, 2, (int(repeated.sum()), width), generator=g, dtype=torch.uint8, device="cpu")
    return codes


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
    return values.index_select(-1, channel_bit)  # a gather, several times slower: only for uneven runs


LAYOUTS = {"tile": tile, "repeat": repeat}


class InputCode:
    """What CODES needs of an entry, besides being an nn.Module that cls(config) builds into GPT.embed
    and whose forward maps (B, T) int64 ids to (B, T, n_embd) float32 vectors."""
    reads = ()  # the GPTConfig code fields it uses: a code_layout or code_width it does not use is refused

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


def refuse(condition, message):
    """A checkpoint's code buffer that fails a check is refused before torch copies it in."""
    if condition:
        raise ValueError(f"checkpoint input code: {message}")


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

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        A = state_dict.get(prefix + "A")
        if A is not None:
            refuse(A.shape != self.A.shape, f"affine A has shape {tuple(A.shape)}, this model needs "
                                            f"{tuple(self.A.shape)}: its vocab_size differs")
            refuse(not bool(((A == 0) | (A == 1)).all()) or gf2_inverse(A.to(torch.uint8).cpu()) is None,
                   "affine A is not an invertible 0/1 matrix over GF(2)")
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


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

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        perm = state_dict.get(prefix + "perm")
        if perm is not None:
            refuse(perm.shape != self.perm.shape, f"perm has shape {tuple(perm.shape)}, this model needs "
                                                  f"{tuple(self.perm.shape)}: its vocab_size differs")
            refuse(perm.is_floating_point() or not bool(((perm >= 0) & (perm < 2 ** self.K)).all())
                   or len(perm.unique()) != len(perm), f"perm is not {len(perm)} distinct {self.K}-bit ids")
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class RandomWideCode(BinaryCode):
    """random_wide: t's row of a random codebook of V distinct code_width-bit codes (code_width > K),
    drawn from code_seed and stored as the uint8 buffer codebook (V x code_width): the frozen
    non-minimal codes of the paper's earlier ablations (64 and 256 bits). The lift is shared."""
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

    def __init__(self, config):
        super().__init__(config)
        self.register_buffer("codebook", draw_wide_codes(config.vocab_size, config.code_width, config.code_seed))

    def bits(self, idx):
        return self.codebook[idx]

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        codebook = state_dict.get(prefix + "codebook")
        if codebook is not None:
            refuse(codebook.shape != self.codebook.shape, f"codebook has shape {tuple(codebook.shape)}, this "
                                                          f"model needs {tuple(self.codebook.shape)}")
            refuse(not bool(((codebook == 0) | (codebook == 1)).all()), "codebook holds values other than 0 and 1")
            refuse(bool(first_duplicates(codebook).any()), "codebook gives two ids the same code")
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


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
    """frozen_random: a fixed, non-minimal code: a frozen N(0, 1) V x n_embd table (times code_scale), drawn from code_seed."""
    reads = ("code_scale", "code_seed")

    def __init__(self, config):
        super().__init__()
        g = torch.Generator().manual_seed(config.code_seed)
        self.register_buffer("table", config.code_scale * torch.randn(config.vocab_size, config.n_embd, generator=g, device="cpu"))

    def forward(self, idx):
        return F.embedding(idx, self.table)


# The input codes by name: add yours here (or, from outside this file, CODES["name"] = YourClass).
CODES = {
    "fixed_min": BinaryCode,
    "affine": AffineCode,
    "gray": GrayCode,
    "permuted": PermutedCode,
    "random_wide": RandomWideCode,
    "learned_lift": LearnedLift,
    "learned": LearnedTable,
    "frozen_random": FrozenRandomTable,
}
INPUT_CODES = CODES.keys()  # a live view: a code registered later is in it too
BASELINE_CODE = "learned"   # what report.py compares every code to


def choices(names):
    return ", ".join(repr(name) for name in names)


def readers(name):
    """The codes that use GPTConfig field `name`."""
    return [code for code, cls in CODES.items() if name in cls.reads]


def require(ok, message):
    if not ok:
        raise ValueError(message)


def code_field(default, help):
    return field(default=default, metadata={"help": help, "code": True})


@dataclass
class GPTConfig:
    vocab_size: int = field(default=65536, metadata={"help": "V, the number of token ids (from the dataset's meta.json)"})
    block_size: int = field(default=1024, metadata={"help": "context length in tokens"})
    n_layer: int = field(default=32, metadata={"help": "transformer blocks"})
    n_head: int = field(default=32, metadata={"help": "attention heads; n_embd / n_head must be even (rotary)"})
    n_embd: int = field(default=1024, metadata={"help": "model width"})
    input_code: str = code_field("fixed_min", f"the input interface: {choices(CODES)} (model.CODES)")
    code_values: str = code_field("bipolar", "what a code bit becomes: 'bipolar' {-1, +1} or 'binary' {0, 1}")
    code_scale: float = code_field(1.0, "the code's values are multiplied by this (finite, nonzero)")
    code_seed: int = code_field(0, f"draws the random codes of {choices(readers('code_seed'))}")
    code_layout: str = code_field("tile", f"code bits to channels: {choices(LAYOUTS)}; channel j carries bit "
                                          f"j mod W (tile) or floor(j W / n_embd) (repeat)")
    code_width: int = code_field(0, f"bits per code of {choices(readers('code_width'))}: above K = ceil(log2 V), "
                                    f"e.g. 64 or 256; 0 for the other codes")
    norm: str = field(default="rmsnorm", metadata={"help": "'rmsnorm' or 'layernorm' (model.py says why not LayerNorm)"})
    bias: bool = field(default=False, metadata={"help": "biases in the linear layers and LayerNorm"})
    dropout: float = field(default=0.0, metadata={"help": "dropout probability"})
    rope_theta: float = field(default=10000.0, metadata={"help": "rotary embedding base"})

    def __post_init__(self):
        closest = difflib.get_close_matches(self.input_code, CODES, 1)
        require(self.input_code in CODES, f"input_code must be one of {choices(CODES)}, got {self.input_code!r}"
                                          + (f" (did you mean {closest[0]!r}?)" if closest else ""))
        require(self.code_values in ("bipolar", "binary"), f"code_values must be 'bipolar' or 'binary', got {self.code_values!r}")
        require(self.code_layout in LAYOUTS, f"code_layout must be one of {choices(LAYOUTS)}, got {self.code_layout!r}")
        require(math.isfinite(self.code_scale) and self.code_scale != 0, f"code_scale must be finite and nonzero, got {self.code_scale}")
        require(self.norm in ("rmsnorm", "layernorm"), f"norm must be 'rmsnorm' or 'layernorm', got {self.norm!r}")
        require(self.vocab_size >= 2, f"vocab_size must be at least 2, got {self.vocab_size}")
        require(min(self.block_size, self.n_head, self.n_embd) >= 1 and self.n_layer >= 0,
                "block_size, n_head and n_embd must be positive and n_layer not negative")
        require(self.n_embd % self.n_head == 0, f"n_embd ({self.n_embd}) must be a multiple of n_head ({self.n_head})")
        require((self.n_embd // self.n_head) % 2 == 0, f"the head size n_embd/n_head must be even for rotary embeddings")
        code = CODES[self.input_code]
        require(isinstance(code, type) and issubclass(code, InputCode) and issubclass(code, nn.Module),
                f"CODES[{self.input_code!r}] must be an nn.Module subclass of model.InputCode, got {code!r}")
        for name in ("code_layout", "code_width"):  # newer than any checkpoint that could set them in vain
            require(getattr(self, name) == GPTConfig.__dataclass_fields__[name].default or name in code.reads,
                    f"{name} applies to input_code {choices(readers(name))} only, not {self.input_code!r}")
        code.check(self)


def code_fields():
    """The GPTConfig fields that set the input code (metadata 'code'): what a variant may differ in from its baseline."""
    return [f.name for f in fields(GPTConfig) if f.metadata.get("code")]

def make_norm(config):
    if config.norm == "rmsnorm":
        return RMSNorm(config.n_embd)
    return nn.LayerNorm(config.n_embd, bias=config.bias)


class RMSNorm(nn.RMSNorm):
    """nn.RMSNorm, with a backward of its own when it trains in float32 on a CPU: torch has no fused
    RMSNorm kernel there, and autograd through the pieces of the formula took 0.60 ms a call forward
    and backward where this takes 0.39 (LayerNorm: 0.25; BENCHMARKS.md). Elsewhere, and under
    torch.compile, the standard F.rms_norm."""

    def forward(self, x):
        if (x.device.type == "cpu" and x.dtype == torch.float32 and torch.is_grad_enabled()
                and not torch.compiler.is_compiling()):
            return RMSNormCPU.apply(x, self.weight, torch.finfo(x.dtype).eps if self.eps is None else self.eps)
        return super().forward(x)


class RMSNormCPU(torch.autograd.Function):
    """y = x * rstd * weight, rstd = 1 / sqrt(mean(x^2) + eps) over the last dimension. Its gradient
    is grad_x = rstd * (g - xhat * mean(g * xhat)) with g = grad * weight and xhat = x * rstd. LayerNorm's
    gradient, given a mean of zero, is that less rstd * mean(g), the term for its mean: so the backward
    is LayerNorm's fused kernel and one correction, where the formula as written takes eight passes."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        size = x.size(-1)
        rstd = torch.linalg.vector_norm(x, dim=-1, keepdim=True).square_().div_(size).add_(eps).rsqrt_()
        ctx.save_for_backward(x, weight, rstd)
        return torch.mul(x, rstd).mul_(weight)

    @staticmethod
    def backward(ctx, grad):
        x, weight, rstd = ctx.saved_tensors
        size = x.size(-1)
        grad_x, grad_weight, _ = torch.ops.aten.native_layer_norm_backward(
            grad, x, [size], torch.zeros_like(rstd), rstd, weight, None, [True, ctx.needs_input_grad[1], False])
        rstd_mean_g = torch.mv(grad.reshape(-1, size), weight).div_(size).view(rstd.shape).mul_(rstd)
        return grad_x.add_(rstd_mean_g), grad_weight, None


def turn(x, cos, sin, sign=1, out=None):
    """x (..., T, head_size) with the pair (i, i + head_size/2) turned by sign times its position's
    angle: cos is (T, head_size), [cos, cos]; sin is (T, head_size/2). One product over the head and
    two multiply-adds over its halves, computed in cos's dtype, into out (x's shape), or a new tensor of
    x's dtype when out is None."""
    h = x.size(-1) // 2
    direct = out is not None and out.dtype == cos.dtype and not torch.compiler.is_compiling()  # no strided out= there
    turned = torch.mul(x, cos, out=out if direct else None)
    turned[..., :h].addcmul_(x[..., h:], sin, value=-sign)  # x1 cos - x2 sin
    turned[..., h:].addcmul_(x[..., :h], sin, value=sign)   # x2 cos + x1 sin
    if out is None:
        return turned.to(x.dtype)
    return turned if direct else out.copy_(turned)


class HeadsWithRotary(torch.autograd.Function):
    """The attention's projection (B, T, 3 * n_embd) -> queries and keys turned by the rotary
    embedding, and values, each (B, n_head, T, head_size). Its backward turns the gradients by the
    opposite angle straight into one gradient of the projection, where autograd through split, turn
    and unbind concatenates them twice more. A layer's attention, forward and backward, on a CPU:
    6.16 ms with it, 6.55 with autograd through those, 5.23 without rotary (BENCHMARKS.md)."""

    @staticmethod
    def forward(ctx, qkv, cos, sin, n_head):
        B, T, three_c = qkv.shape
        heads = qkv.view(B, T, 3, n_head, three_c // (3 * n_head)).permute(2, 0, 3, 1, 4)
        q, k = turn(heads[:2], cos, sin).unbind(0)  # queries and keys turned together: half the ops
        ctx.save_for_backward(cos, sin)
        return q, k, heads[2]

    @staticmethod
    def backward(ctx, grad_q, grad_k, grad_v):
        cos, sin = ctx.saved_tensors
        B, n_head, T, head_size = grad_v.shape
        grad = grad_v.new_empty(B, T, 3, n_head, head_size)
        heads = grad.permute(2, 0, 3, 1, 4)
        turn(grad_q, cos, sin, sign=-1, out=heads[0])
        turn(grad_k, cos, sin, sign=-1, out=heads[1])
        heads[2].copy_(grad_v)
        return grad.view(B, T, 3 * n_head * head_size), None, None, None


class CausalSelfAttention(nn.Module):
    def __init__(self, config, layer):
        super().__init__()
        self.layer = layer
        self.n_head = config.n_head
        self.dropout = config.dropout
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x, cos, sin, kv_cache=None):
        B, T, C = x.shape
        q, k, v = HeadsWithRotary.apply(self.c_attn(x), cos, sin, self.n_head)
        mask, causal = None, True  # causal with T = 1 is one query seeing one key: no need to test T
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
        head_size = config.n_embd // config.n_head
        inv_freq = config.rope_theta ** -(torch.arange(0, head_size, 2, dtype=torch.float32) / head_size)
        angles = torch.outer(torch.arange(config.block_size, dtype=torch.float32), inv_freq)
        self.register_buffer("rope_cos", torch.cat((angles.cos(), angles.cos()), -1), persistent=False)  # (block_size, head_size)
        self.register_buffer("rope_sin", angles.sin(), persistent=False)  # (block_size, head_size / 2)
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

    def forward(self, idx, targets=None, kv_cache=None, all_logits=False, lengths=None):
        """idx (B, T) ids -> (logits, loss). With targets: logits of every position and the mean
        cross-entropy. Without: logits of the last position (B, 1, V), or of all if all_logits; rows
        padded on the right give lengths (B,), their real lengths, to get the logits of their last
        real position instead."""
        B, T = idx.shape
        if kv_cache is None and T > self.config.block_size:
            raise ValueError(f"sequence of {T} tokens is longer than block_size {self.config.block_size}")
        positions = kv_cache.begin(B, T, idx.device) if kv_cache is not None else 0
        if isinstance(positions, int):
            cos, sin = self.rope_cos[positions:positions + T], self.rope_sin[positions:positions + T]
        else:  # each row at its own positions: (B, 1, T, hs) and (B, 1, T, hs/2), broadcast over the heads
            cos, sin = self.rope_cos[positions].unsqueeze(1), self.rope_sin[positions].unsqueeze(1)
        x = self.drop(self.embed(idx).to(self.lm_head.weight.dtype))  # the codes are float32; weights may be bf16
        for block in self.blocks:
            x = block(x, cos, sin, kv_cache)
        if kv_cache is not None:
            kv_cache.advance(B, T)
        x = self.norm_f(x)
        if targets is None:
            if lengths is not None and not all_logits:
                x = x[torch.arange(B, device=x.device), lengths - 1].unsqueeze(1)
            return self.lm_head(x if all_logits else x[:, -1:]), None
        logits = self.lm_head(x)
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        return logits, loss

    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, eos_id=None, generator=None):
        """idx (B, T) followed by up to max_new_tokens sampled tokens; temperature=0 is greedy."""
        from engine import generate_stream
        new = list(generate_stream(self, idx, max_new_tokens, temperature, top_k, top_p, eos_id, generator))
        return torch.cat([idx] + new, dim=1)

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
        learned_lift's K x n_embd map is left out too, 0.003% at the paper config) plus
        12 * n_layer * n_embd * block_size for attention scores and values over the full T x T
        square. A causal flash kernel skips most of the masked half, so an MFU from this count reads
        above what the GPU executes (6.7% at the paper config)."""
        counts = self.param_counts()
        cfg = self.config
        return 6 * (counts["trainable"] - counts["input_trainable"]) + 12 * cfg.n_layer * cfg.n_embd * cfg.block_size


# Dense bf16 tensor-core peaks (FLOP/s), for MFU. The first key found in torch.cuda.get_device_name()
# wins, so the H100 variants come before "H100" (the SXM part).
PEAK_BF16_FLOPS = {"H200": 989e12, "H100 PCIe": 756e12, "H100 NVL": 835e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 70e12, "4090": 165e12}


def peak_flops(device_name):
    """The bf16 peak of a GPU called device_name, or None when it is not in the table (MFU unknown)."""
    return next((flops for key, flops in PEAK_BF16_FLOPS.items() if key in device_name), None)

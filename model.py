"""
A GPT decoder whose input embedding table can be replaced by fixed minimal binary token codes.

The paper's idea is the class BinaryCode: a token id t in a vocabulary of V needs only
K = ceil(log2 V) bits, so the model's input is t's K-bit code (LSB first), tiled across the width,
with zero trainable parameters and no V x n_embd table. `input_code` picks the input interface:
  fixed_min      the code itself
  affine         the code recoded by a fixed random invertible affine map over GF(2): c~ = A c xor b
  learned        the usual trainable nn.Embedding(V, n_embd): the baseline
  frozen_random  a frozen Gaussian V x n_embd table: fixed, but not minimal (an ablation)
Everything else is shared and matched: pre-norm blocks, rotary position embeddings on q and k,
causal attention through F.scaled_dot_product_attention, a GELU MLP of 4x width, a final norm and
an untied trainable lm_head. No bias, no positional table, GPT-2 style init.

Why the defaults are RMSNorm and bipolar {-1, +1} codes: a pre-norm block reads norm(x), and
LayerNorm subtracts the mean, which sends every constant vector to one point: id 0 (all bits 0) and
id 65535 (all bits 1, our <|endoftext|>) would look the same to the first block, with {0,1} codes
and with {-1,+1} codes alike. RMSNorm only rescales, and every bipolar code has RMS exactly
code_scale, so the first block reads the codes unchanged (tests/test_model.py checks all ids).
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

INPUT_CODES = ("fixed_min", "affine", "learned", "frozen_random")


@dataclass
class GPTConfig:
    vocab_size: int = 65536
    block_size: int = 1024
    n_layer: int = 32
    n_head: int = 32
    n_embd: int = 1024
    input_code: str = "fixed_min"
    code_values: str = "bipolar"  # 'bipolar': bits -> {-1, +1}; 'binary': bits -> {0, 1}
    code_scale: float = 1.0       # the code's values are multiplied by this
    code_seed: int = 0            # draws A and b ('affine') or the table ('frozen_random')
    norm: str = "rmsnorm"         # 'rmsnorm' or 'layernorm' (see the docstring for why not LayerNorm)
    bias: bool = False
    dropout: float = 0.0
    rope_theta: float = 10000.0

    def __post_init__(self):
        checks = [
            (self.input_code in INPUT_CODES, f"input_code must be one of {INPUT_CODES}, got {self.input_code!r}"),
            (self.code_values in ("bipolar", "binary"), f"code_values must be 'bipolar' or 'binary', got {self.code_values!r}"),
            (self.norm in ("rmsnorm", "layernorm"), f"norm must be 'rmsnorm' or 'layernorm', got {self.norm!r}"),
            (self.vocab_size >= 2, f"vocab_size must be at least 2, got {self.vocab_size}"),
            (self.n_embd % self.n_head == 0, f"n_embd ({self.n_embd}) must be a multiple of n_head ({self.n_head})"),
            ((self.n_embd // self.n_head) % 2 == 0, f"the head size n_embd/n_head must be even for rotary embeddings"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)


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


def draw_affine(K, seed):
    """A in GL(K, 2) and b in {0,1}^K, drawn on a CPU generator so every machine draws the same ones."""
    g = torch.Generator().manual_seed(seed)
    while True:  # a random 0/1 matrix is invertible with probability about 0.29
        A = torch.randint(0, 2, (K, K), generator=g, dtype=torch.uint8, device="cpu")
        if gf2_inverse(A) is not None:
            return A, torch.randint(0, 2, (K,), generator=g, dtype=torch.uint8, device="cpu")


class BinaryCode(nn.Module):
    """Zero-parameter lift: id t -> its K-bit code (affine-recoded if asked), tiled to n_embd channels.

    Channel j carries bit (j mod K) of the code; bit k of t is (t >> k) & 1. The affine map acts on
    the bits, which is the same as mapping t to the id u whose bits are A c(t) xor b: u is the XOR of
    the columns of A picked by t's set bits, and b.
    """

    def __init__(self, config):
        super().__init__()
        self.K = code_bits(config.vocab_size)
        self.bipolar = config.code_values == "bipolar"
        self.scale = config.code_scale
        self.n_embd = config.n_embd
        self.tiles = -(-config.n_embd // self.K)  # ceil: the last tile may be partial
        self.register_buffer("bit_shift", torch.arange(self.K), persistent=False)
        if config.input_code == "affine":
            A, b = draw_affine(self.K, config.code_seed)
            self.register_buffer("A", A)  # persistent: a checkpoint carries its own code
            self.register_buffer("b", b)
        else:
            self.A = self.b = None

    def recode(self, idx):
        if self.A is None:
            return idx
        columns = (self.A.long() << self.bit_shift[:, None]).sum(0)  # column j of A as an integer
        u = (self.b.long() << self.bit_shift).sum()
        for j in range(self.K):
            u = u ^ (((idx >> j) & 1) * columns[j])
        return u

    def forward(self, idx):  # (B, T) int64 -> (B, T, n_embd) float32
        bits = (self.recode(idx).unsqueeze(-1) >> self.bit_shift) & 1  # (B, T, K)
        values = (2 * bits - 1 if self.bipolar else bits).float() * self.scale
        return values.tile((self.tiles,))[..., :self.n_embd]  # channel j carries bit j mod K

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        A = state_dict.get(prefix + "A")
        if self.A is not None and A is not None:  # refuse a broken code before torch copies it in
            if A.shape != self.A.shape:
                raise ValueError(f"checkpoint affine code A has shape {tuple(A.shape)}, this model needs "
                                 f"{tuple(self.A.shape)}: its vocab_size differs")
            if gf2_inverse(A.to(torch.uint8).cpu() % 2) is None or not bool(((A == 0) | (A == 1)).all()):
                raise ValueError("checkpoint affine code A is not an invertible 0/1 matrix over GF(2)")
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class FrozenRandomTable(nn.Module):
    """A fixed, non-minimal code: a frozen N(0, 1) V x n_embd table (times code_scale), drawn from code_seed."""

    def __init__(self, config):
        super().__init__()
        g = torch.Generator().manual_seed(config.code_seed)
        self.register_buffer("table", config.code_scale * torch.randn(config.vocab_size, config.n_embd, generator=g, device="cpu"))

    def forward(self, idx):
        return F.embedding(idx, self.table)


def make_norm(config):
    if config.norm == "rmsnorm":
        return nn.RMSNorm(config.n_embd)
    return nn.LayerNorm(config.n_embd, bias=config.bias)


def rotate(x, cos, sin):  # x: (B, n_head, T, head_size); rotate pairs (i, i + head_size/2)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).type_as(x)


class KVCache:
    """Keys and values of every layer for up to block_size positions; `pos` is how many are filled."""

    def __init__(self, config, batch_size):
        self.shape = (config.n_layer, batch_size, config.n_head, config.block_size, config.n_embd // config.n_head)
        self.k = self.v = None
        self.pos = 0

    def update(self, layer, k, v):  # writes (B, nh, T, hs) at pos, returns all keys and values so far
        if self.k is None:
            self.k = torch.zeros(self.shape, dtype=k.dtype, device=k.device)
            self.v = torch.zeros(self.shape, dtype=v.dtype, device=v.device)
        end = self.pos + k.size(2)
        self.k[layer, :, :, self.pos:end] = k
        self.v[layer, :, :, self.pos:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]


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
        q, k, v = self.c_attn(x).view(B, T, 3, self.n_head, C // self.n_head).permute(2, 0, 3, 1, 4)
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        start = 0
        if kv_cache is not None:
            start = kv_cache.pos
            k, v = kv_cache.update(self.layer, k, v)
        mask = None
        if T > 1 and start > 0:  # new queries after cached ones: query i sees keys up to start + i
            mask = torch.arange(k.size(2), device=x.device) <= start + torch.arange(T, device=x.device)[:, None]
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=(T > 1 and start == 0),
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
        self.config = config
        if config.input_code in ("fixed_min", "affine"):
            self.embed = BinaryCode(config)
        elif config.input_code == "learned":
            self.embed = nn.Embedding(config.vocab_size, config.n_embd)
        else:
            self.embed = FrozenRandomTable(config)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config, layer) for layer in range(config.n_layer))
        self.norm_f = make_norm(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        head_size = config.n_embd // config.n_head
        inv_freq = config.rope_theta ** -(torch.arange(0, head_size, 2, dtype=torch.float32) / head_size)
        angles = torch.outer(torch.arange(config.block_size, dtype=torch.float32), inv_freq)
        self.register_buffer("rope_cos", angles.cos(), persistent=False)  # (block_size, head_size / 2)
        self.register_buffer("rope_sin", angles.sin(), persistent=False)
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2: residual projections scaled by 1/sqrt(2 n_layer)
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, idx, targets=None, kv_cache=None, all_logits=False):
        """idx (B, T) ids -> (logits, loss). With targets: logits of every position and the mean
        cross-entropy. Without: logits of the last position (B, 1, V), or of all if all_logits."""
        B, T = idx.shape
        start = kv_cache.pos if kv_cache is not None else 0
        if start + T > self.config.block_size:
            raise ValueError(f"sequence of {start + T} tokens is longer than block_size {self.config.block_size}")
        cos, sin = self.rope_cos[start:start + T], self.rope_sin[start:start + T]
        x = self.drop(self.embed(idx).to(self.lm_head.weight.dtype))  # the codes are float32; weights may be bf16
        for block in self.blocks:
            x = block(x, cos, sin, kv_cache)
        if kv_cache is not None:
            kv_cache.pos += T
        x = self.norm_f(x)
        if targets is None:
            return self.lm_head(x if all_logits else x[:, -1:]), None
        logits = self.lm_head(x)
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        return logits, loss

    @torch.no_grad()
    def generate_stream(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, eos_id=None,
                        generator=None):
        """Yields the next token (B, 1) at each step, using a KV cache. Prompts longer than block_size
        keep their last block_size tokens. Once the context is full, each step recomputes the last
        block_size tokens, exactly what a model that crops its input would see. Rows that produced
        eos_id keep emitting it; the stream ends when every row has."""
        window = idx[:, -self.config.block_size:]
        kv_cache = KVCache(self.config, idx.size(0))
        logits, _ = self(window, kv_cache=kv_cache)
        done = torch.zeros(idx.size(0), 1, dtype=torch.bool, device=idx.device)
        for step in range(max_new_tokens):
            if step > 0:
                window = torch.cat((window, token), dim=1)
                if kv_cache.pos == self.config.block_size:
                    window = window[:, -self.config.block_size:]
                    kv_cache = KVCache(self.config, idx.size(0))
                    logits, _ = self(window, kv_cache=kv_cache)
                else:
                    logits, _ = self(token, kv_cache=kv_cache)
            token = sample_next(logits[:, -1], temperature, top_k, top_p, generator)
            if eos_id is not None:
                token = torch.where(done, eos_id, token)
                done |= token == eos_id
            yield token
            if eos_id is not None and bool(done.all()):
                return

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, eos_id=None, generator=None):
        """idx (B, T) followed by up to max_new_tokens sampled tokens; temperature=0 is greedy."""
        new = list(self.generate_stream(idx, max_new_tokens, temperature, top_k, top_p, eos_id, generator))
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
        weight of every matmul (the input lift or table lookup does none, so all codes cost the same)
        plus 12 * n_layer * n_embd * block_size for attention scores and values over the full T x T
        square. A causal flash kernel skips most of the masked half, so an MFU from this count reads
        above what the GPU executes (6.7% at the paper config)."""
        counts = self.param_counts()
        cfg = self.config
        return 6 * (counts["trainable"] - counts["input_trainable"]) + 12 * cfg.n_layer * cfg.n_embd * cfg.block_size


def sample_next(logits, temperature=1.0, top_k=None, top_p=None, generator=None):
    """(B, V) logits -> (B, 1) ids: greedy when temperature is 0, else softmax sampling of the
    top_k most likely ids and the smallest set whose probability reaches top_p."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        before = sorted_logits.softmax(dim=-1).cumsum(dim=-1) - sorted_logits.softmax(dim=-1)
        sorted_logits = sorted_logits.masked_fill(before >= top_p, float("-inf"))  # the top one always stays
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator)


# Dense bf16 tensor-core peaks (FLOP/s), for MFU. The first key found in torch.cuda.get_device_name()
# wins, so the H100 variants come before "H100" (the SXM part).
PEAK_BF16_FLOPS = {"H200": 989e12, "H100 PCIe": 756e12, "H100 NVL": 835e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 70e12, "4090": 165e12}


def peak_flops(device_name):
    """The bf16 peak of a GPU called device_name, or None when it is not in the table (MFU unknown)."""
    return next((flops for key, flops in PEAK_BF16_FLOPS.items() if key in device_name), None)

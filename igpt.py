"""
The whole Image GPT model (Chen et al. 2020, "Generative Pretraining from Pixels") in one file.

An image is n_px*n_px palette indices in raster order. The network is GPT-2 with the original's changes:
a norm that does not subtract the mean (gain only), x*sigmoid(1.702x), no biases, a learned start-of-sequence
vector `sos` in front of the shifted token embeddings, and an untied, zero-initialised output head `wtet`.
Position i reads [sos, x_0, ..., x_{i-1}] and predicts x_i.

    model = IGPT(IGPTConfig.preset("s"))
    logits, loss = model(tokens)                     # tokens: [B, n_px*n_px] int64, loss in nats per token
    tokens = generate(model, num_samples=8)          # KV-cached sampling
    feats = model.features(tokens, layers=[12])      # linear-probe features, [B, 1, n_embd]

On the GPU a generation step runs each block as five Triton kernels (norms, activation, residual adds and the
cache write fused into the products and the attention around them), and 16-bit inference fuses the MLP's
activation into its first product (see "the GPU kernels").
Also here: the checkpoint format (`save_checkpoint`, `IGPT.from_checkpoint`), `configure_optimizers` and
`estimate_mfu` as in nanoGPT.
"""
import inspect
import math
import os
import weakref
from dataclasses import asdict, dataclass, field, fields
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import atomic_write

PRESETS = {  # the released models: n_embd, n_head, n_layer (76M, 455M, 1.4B parameters)
    "s": dict(n_embd=512, n_head=8, n_layer=24),
    "m": dict(n_embd=1024, n_head=8, n_layer=36),
    "l": dict(n_embd=1536, n_head=16, n_layer=48),
}


@dataclass
class IGPTConfig:
    n_px: int = 32        # images are n_px x n_px, so sequences are n_px**2 tokens long
    n_vocab: int = 512    # palette size
    n_embd: int = 512
    n_head: int = 8
    n_layer: int = 24
    n_classes: int = 0    # > 0 adds the fine-tuning classifier on the mean-pooled final features

    def __post_init__(self):
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} must be divisible by n_head={self.n_head}")

    @property
    def block_size(self) -> int:
        return self.n_px * self.n_px

    @classmethod
    def preset(cls, name: str, **overrides) -> "IGPTConfig":
        """A released size ("s", "m", "l") with any field overridden, e.g. preset("s", n_px=48)."""
        if name not in PRESETS:
            raise ValueError(f"unknown model size {name!r}; choose one of {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})


class Norm(nn.Module):
    """The original's norm: x * rsqrt(mean(x^2) + eps) * g. No mean subtraction, no bias."""

    def __init__(self, n_embd: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.g = nn.Parameter(torch.ones(n_embd))

    def forward(self, x):
        return F.rms_norm(x, (x.size(-1),), self.g, self.eps)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: IGPTConfig):
        super().__init__()
        self.n_head = config.n_head
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=False)  # q, k, v in one matmul
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=False)
        self.kv_cache = None  # a KVCache for generation, used by the calls that pass input_pos

    def forward(self, x, input_pos=None):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).view(B, T, 3, self.n_head, C // self.n_head).permute(2, 0, 3, 1, 4)
        if input_pos is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:  # generating: attend to the cached positions up to each query's own
            k, v = self.kv_cache.update(input_pos, k, v)
            mask = input_pos[:, None] >= torch.arange(k.size(2), device=x.device)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, C))


def activation(x):
    """The original's activation: x * sigmoid(1.702 x), a sigmoid approximation of GELU."""
    return x * torch.sigmoid(1.702 * x)


class MLP(nn.Module):
    def __init__(self, config: IGPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=False)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=False)

    def forward(self, x):
        if x.is_cuda and x.dtype in (torch.bfloat16, torch.float16) and not torch.is_grad_enabled():
            # 16-bit inference on the GPU: the activation in the product's epilogue (see linear_gelu)
            return self.c_proj(linear_gelu(x.flatten(0, -2), self.c_fc.weight).view(*x.shape[:-1], -1))
        return self.c_proj(activation(self.c_fc(x)))


class Block(nn.Module):
    def __init__(self, config: IGPTConfig):
        super().__init__()
        self.ln_1 = Norm(config.n_embd)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = Norm(config.n_embd)
        self.mlp = MLP(config)

    def forward(self, x, input_pos=None):
        x = x + self.attn(self.ln_1(x), input_pos)
        return x + self.mlp(self.ln_2(x))


class KVCache(nn.Module):
    """Keys and values of every position generated so far, in fixed buffers so a decode step has static shapes."""

    def __init__(self, batch_size, n_head, max_len, head_dim, dtype, device):
        super().__init__()
        shape = (batch_size, n_head, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, input_pos, k, v):
        self.k[:, :, input_pos] = k.to(self.k.dtype)
        self.v[:, :, input_pos] = v.to(self.v.dtype)
        return self.k, self.v


class IGPT(nn.Module):
    def __init__(self, config: IGPTConfig):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.n_vocab, config.n_embd)
        self.wpe = nn.Embedding(config.block_size, config.n_embd)
        self.sos = nn.Parameter(torch.empty(config.n_embd))
        self.h = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = Norm(config.n_embd)
        self.wtet = nn.Linear(config.n_embd, config.n_vocab, bias=False)  # untied output head
        self.clf = nn.Linear(config.n_embd, config.n_classes, bias=False) if config.n_classes else None
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):
        """The original initialisation: normal with these standard deviations, output heads at zero."""
        d, n_layer = self.config.n_embd, self.config.n_layer
        nn.init.normal_(self.wte.weight, std=0.02)
        nn.init.normal_(self.wpe.weight, std=0.01)
        nn.init.normal_(self.sos, std=0.02)
        for block in self.h:
            nn.init.normal_(block.attn.c_attn.weight, std=1 / math.sqrt(d))
            nn.init.normal_(block.attn.c_proj.weight, std=1 / math.sqrt(d * n_layer))
            nn.init.normal_(block.mlp.c_fc.weight, std=0.02)
            nn.init.normal_(block.mlp.c_proj.weight, std=0.02)
            block.ln_1.g.fill_(1.0)
            block.ln_2.g.fill_(1.0)
        self.ln_f.g.fill_(1.0)
        nn.init.zeros_(self.wtet.weight)
        if self.clf is not None:
            nn.init.zeros_(self.clf.weight)

    def get_num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def embed(self, tokens):
        """Inputs to the first block: [sos, wte[x_0], ..., wte[x_{T-2}]] + wpe, so position i predicts x_i."""
        B, T = tokens.shape
        if T > self.config.block_size:
            raise ValueError(f"sequence of {T} tokens is longer than the model's {self.config.block_size}")
        h = torch.cat([self.sos.expand(B, 1, -1), self.wte(tokens[:, :-1])], dim=1)
        return h + self.wpe.weight[:T]

    def hidden(self, tokens):
        """Final normalised hidden states [B, T, n_embd]."""
        h = self.embed(tokens)
        for block in self.h:
            h = block(h)
        return self.ln_f(h)

    def forward(self, tokens):
        """logits [B, T, n_vocab] where position i predicts tokens[:, i], and the mean loss in nats per token."""
        logits = self.wtet(self.hidden(tokens))
        loss = F.cross_entropy(logits.float().flatten(0, 1), tokens.flatten())
        return logits, loss

    def classify(self, tokens):
        """Fine-tuning: class logits from the mean-pooled final features, and the generative loss beside them."""
        if self.clf is None:
            raise ValueError("this model has no classifier: build it with IGPTConfig(n_classes=...)")
        h = self.hidden(tokens)
        gen_loss = F.cross_entropy(self.wtet(h).float().flatten(0, 1), tokens.flatten())
        return self.clf(h.mean(dim=1)).float(), gen_loss

    @torch.no_grad()
    def features(self, tokens, layers):
        """Linear-probe features: the residual stream after each block in `layers` (1 = after the first block),
        normalised by the mean-free norm without its gain and averaged over positions. Returns
        float32 [B, len(layers), n_embd], all from one forward pass that stops at the deepest layer asked for."""
        if not layers or min(layers) < 1 or max(layers) > self.config.n_layer:
            raise ValueError(f"layers must lie in 1..{self.config.n_layer}, got {list(layers)}")
        wanted, out = set(layers), {}
        h = self.embed(tokens)
        for i, block in enumerate(self.h[: max(layers)], start=1):
            h = block(h)
            if i in wanted:
                out[i] = F.rms_norm(h.float(), (h.size(-1),), eps=self.ln_f.eps).mean(dim=1)
        return torch.stack([out[i] for i in layers], dim=1)

    # ---- generation: a static KV cache and a one-token step, in the style of gpt-fast ----

    def setup_kv_cache(self, batch_size, dtype=None):
        """Allocate a KV cache for batch_size sequences of block_size tokens (None frees it, and what generate
        keeps for its next call)."""
        c = self.config
        _samplers.pop(self, None)
        for block in self.h:
            block.attn.kv_cache = None if batch_size is None else KVCache(
                batch_size, c.n_head, c.block_size, c.n_embd // c.n_head,
                dtype or self.wte.weight.dtype, self.wte.weight.device)

    def prefill(self, tokens):
        """Fill the cache with positions 0..P for the known tokens x_0..x_{P-1} ([B, P], P may be 0) and return
        the logits [B, n_vocab] for x_P."""
        B, P = tokens.shape
        h = self.embed(F.pad(tokens, (0, 1)))  # the padding token is never read: it would be the input at P+1
        return self._decode(h, torch.arange(P + 1, device=h.device))[:, -1]

    def decode_step(self, token, input_pos, halves=False):
        """One cached step: token [B] is x_{p-1} at position p = input_pos (a [1] tensor on the model's device;
        at p = 0 the input is sos and token is not read); returns logits [B, n_vocab] for x_p. halves: run the
        fused kernels as two chains of half the batch each (see fused_decode_halves)."""
        h = torch.where(input_pos == 0, self.sos, self.wte(token))[:, None] + self.wpe(input_pos)
        return self._decode(h, input_pos, halves)[:, -1]

    def _decode(self, h, input_pos, halves=False):
        if h.size(1) == 1 and self.can_fuse_decode(h):
            x = h[:, 0]
            decode = fused_decode_halves if halves else fused_decode
            return decode(self, x, *norm_parts(x, self.h[0].ln_1.g), input_pos).float()[:, None]
        for block in self.h:
            h = block(h, input_pos)
        return self.wtet(self.ln_f(h)).float()

    def can_fuse_decode(self, h):
        """Whether a one-token step runs the fused kernels below: on the GPU with Triton (or in Triton's CPU
        interpreter, TRITON_INTERPRET=1, which the tests use), for widths and palettes in multiples of 16."""
        c = self.config
        return (triton is not None and (h.is_cuda or _interpreted())
                and c.n_embd % 16 == 0 and c.n_vocab % 16 == 0)

    @classmethod
    def from_checkpoint(cls, path, map_location="cpu"):
        """Load a model saved by save_checkpoint (or train.py). The palette, when the file has one, is set as
        `model.palette` (float32 [n_vocab, 3] in [-1, 1]), else None."""
        ckpt = load_checkpoint(path, map_location)
        model = cls.from_state_dict(IGPTConfig(**ckpt["config"]), ckpt["model"])
        model.palette = ckpt.get("palette")
        return model

    @classmethod
    def from_state_dict(cls, config, state):
        """A model of this config holding the tensors of `state` themselves (every one required): built on the meta
        device, so no random initialisation runs only to be overwritten (seconds for iGPT-L)."""
        with torch.device("meta"):
            model = cls(config)
        model.load_state_dict(state, assign=True)
        return model

    # ---- training helpers, as in nanoGPT ----

    def configure_optimizers(self, learning_rate, betas=(0.9, 0.95), weight_decay=0.0, device_type="cpu"):
        """AdamW; weight decay (none in the paper's recipe) only on matrices, never on gains, sos or embeddings
        of positions; fused on CUDA."""
        decay = [p for n, p in self.named_parameters() if p.requires_grad and p.dim() >= 2 and n != "wpe.weight"]
        no_decay = [p for n, p in self.named_parameters() if p.requires_grad and not any(p is q for q in decay)]
        groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        fused = device_type == "cuda" and "fused" in inspect.signature(torch.optim.AdamW).parameters
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, **({"fused": True} if fused else {}))

    def flops_per_token(self) -> float:
        """Training FLOPs (forward + backward) per token: 6 per parameter plus the attention scores."""
        c = self.config
        return 6 * self.get_num_params() + 12 * c.n_layer * c.n_embd * c.block_size

    def estimate_mfu(self, images_per_second, peak_flops=989e12):
        """Model FLOPs utilisation against a peak rate (default: H100 SXM dense bf16)."""
        return self.flops_per_token() * self.config.block_size * images_per_second / peak_flops


# ---- the GPU kernels: the decode step in five kernels a block, and the MLP's product with its activation ----
#
# With one new token per sequence every matrix product is thin (B rows against a weight of up to 2048 x 512), so a
# kernel costs its launch and latency, not its arithmetic, and the plain block's eleven kernels a step (two norms,
# four products, the activation, two cache writes, attention and its combine) cost nearly as much as the KV-cache
# reads that are the real work. Each norm fuses into the product that follows it, (x g) W * rsqrt(mean(x^2) + eps)
# with the row scale applied after the product, the activation and the residual add into the product's epilogue,
# and the cache write into attention, which leaves five kernels a block:
#     qkv = norm_1(x) W_attn,  y = attend(q, cache + (k, v)),  x += y W_proj,  h = gelu(norm_2(x) W_fc),  x += h W_out
# A norm needs whole rows and a product's program sees a tile, so each kernel that updates x also writes what the
# next norm reads, x g and its tile's sums of squares of x's rows: then the product's loop only loads and
# multiplies, which keeps its loads pipelined (an elementwise pass over x inside the loop stalls it, ~2 us a product).
# On Hopper they launch with programmatic dependent launch (PDL): each kernel is scheduled while the one before it
# finishes and waits at its start for that kernel's results, so the gaps between a step's 120 kernels overlap work,
# and what does not depend on that kernel is asked for before the wait: the products' weights, attention's first
# block of the cache and, in L2, the positions after it.
# In 16-bit inference over whole sequences (probe features, the prefill of completions) the products are
# large and cuBLAS's are the fastest, except the MLP's first: its activation, a separate pass over the widest
# tensor, costs nearly as much as the product, so linear_gelu applies it in a Triton product's epilogue.

try:  # Triton >= 3.4 (PyTorch >= 2.8); without it (CPU-only installs, older versions) the blocks' own forward runs
    import triton
    import triton.language as tl
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:
    triton = None

# Attention's launch, the fastest on an H100 for iGPT-S at batch 64 of 512-4096 programs, blocks of 32-128 positions
# and 2-8 warps:
DECODE_BLOCK = 128       # cache positions per loop iteration of an attention program
DECODE_FIRST_BLOCK = 16  # positions of its first block, read before the wait for its inputs, when the
                         # programs fit at once (at most DECODE_PROGRAMS of them)
DECODE_AHEAD = 32        # positions after the first block asked for in L2 before the wait (on Hopper)
DECODE_TILE = 8192       # at most this many elements of k (and of v) per iteration, so wider heads keep registers
DECODE_PROGRAMS = 512    # split a layer's attention over the positions until it has about this many programs
DECODE_WARPS = 2         # twice as many for heads padded to a power of 2, as iGPT-L's 96 (see sample_throughput)

if triton is not None:
    @triton.jit
    def _wait_for_inputs(PDL: tl.constexpr):
        # With programmatic dependent launch a kernel starts while the one before it finishes: wait here until that
        # kernel's writes are visible, then let the next kernel start in turn.
        if PDL:
            gdc_wait()
            gdc_launch_dependents()

    @triton.jit
    def _prefetch_to_l2(ptrs):
        # ask for the 128-byte lines at ptrs to be brought into L2, without waiting for them
        tl.inline_asm_elementwise("prefetch.global.L2 [$1];", "=r,l", [ptrs], dtype=tl.int32, is_pure=False, pack=1)

    @triton.jit
    def _gelu(x):
        # x * sigmoid(1.702 x) as x / (1 + 2^(-1.702 log2(e) x)): one exp2 and one fast division, which matters
        # where the epilogue of a large product is the bottleneck
        return tl.fdiv(x, 1.0 + tl.exp2(-2.4554669595930156 * x))

    @triton.jit
    def _fused_linear(x_ptr, w_ptr, sq_ptr, res_ptr, gain_ptr, out_ptr, out_gained_ptr, out_sq_ptr, M, N, K, n_parts,
                      eps, NORM: tl.constexpr, GELU: tl.constexpr, RESIDUAL: tl.constexpr, NEXT_NORM: tl.constexpr,
                      PARTS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                      LINE: tl.constexpr, PDL: tl.constexpr):
        # out[m, n] = act(sum_k x[m, k] w[n, k] * r[m]) (+ res[m, n]), w nn.Linear's [N, K], N and K multiples of the
        # blocks. NORM: x is the normed input's x * g, and r[m] = rsqrt(sum_p sq[m, p] / K + eps) from the partial
        # sums of squares of its row (else r = 1), so the loop only loads and multiplies. NEXT_NORM: also write what
        # the next norm reads: out * gain and this tile's sums of squares of out's rows.
        rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        if PDL and tl.program_id(0) == 0:
            # the weights do not depend on the kernel before: while it finishes, the first tile of rows asks for its
            # columns of them in L2 (LINE elements a line), where every tile's loop below finds them (~2 us less a
            # block step)
            for k0 in range(0, K, BLOCK_K):
                _prefetch_to_l2(w_ptr + rn[:, None] * K + k0 + tl.arange(0, BLOCK_K // LINE)[None, :] * LINE)
        _wait_for_inputs(PDL)
        rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        rows = rm[:, None] < M
        if NORM:
            p = tl.arange(0, PARTS)
            sq = tl.load(sq_ptr + rm[:, None] * n_parts + p[None, :], mask=rows & (p[None, :] < n_parts), other=0.0)
            r = tl.rsqrt(tl.sum(sq, 1) / K + eps)
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for k0 in range(0, K, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(x_ptr + rm[:, None] * K + rk[None, :], mask=rows, other=0.0)
            w = tl.load(w_ptr + rn[None, :] * K + rk[:, None])
            acc = tl.dot(x, w, acc, input_precision="ieee")  # ieee: float32 weights stay exact (bf16 ignores it)
        if NORM:
            acc *= r[:, None]
        if GELU:
            acc = _gelu(acc)
        offsets = rm[:, None] * N + rn[None, :]
        if RESIDUAL:
            acc += tl.load(res_ptr + offsets, mask=rows, other=0.0).to(tl.float32)
        out = acc.to(out_ptr.dtype.element_ty)
        tl.store(out_ptr + offsets, out, mask=rows)
        if NEXT_NORM:
            out = out.to(tl.float32)  # as stored, so the next norm sees the values the residual stream holds
            tl.store(out_sq_ptr + rm * tl.num_programs(1) + tl.program_id(1), tl.sum(out * out, 1), mask=rm < M)
            gained = out * tl.load(gain_ptr + rn).to(tl.float32)[None, :]
            tl.store(out_gained_ptr + offsets, gained.to(out_ptr.dtype.element_ty), mask=rows)

    @triton.jit
    def _linear_gelu(x_desc, w_desc, out_desc, M, N, K, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, PROGRAMS: tl.constexpr):
        # gelu(x w^T), persistent: PROGRAMS programs (one per SM) walk the output tiles, GROUP_M tiles of rows at a
        # time, so the rows of x a group reads stay in L2 while every column tile uses them; flatten lets the next
        # tile's loads start during this tile's epilogue. TMA zero-fills reads past the edges and clips writes.
        tiles_m, tiles_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
        group_tiles = GROUP_M * tiles_n
        for tile in tl.range(tl.program_id(0), tiles_m * tiles_n, PROGRAMS, flatten=True):
            first_m = tile // group_tiles * GROUP_M
            group_m = tl.minimum(tiles_m - first_m, GROUP_M)
            m = (first_m + tile % group_tiles % group_m) * BLOCK_M
            n = (tile % group_tiles // group_m) * BLOCK_N
            acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
            for k in range(0, K, BLOCK_K):
                acc = tl.dot(x_desc.load([m, k]), w_desc.load([n, k]).T, acc)
            out_desc.store([m, n], _gelu(acc).to(out_desc.dtype))

    @triton.jit
    def _softmax_scores(q, k, valid, m):
        # a block of keys into the online softmax of running max m: the new max, the block's weights exp(s - max)
        # and the factor that rescales what was summed before
        s = tl.where(valid, tl.sum(k.to(tl.float32) * q[None, :], 1), float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 0))
        return m_new, tl.exp(s - m_new), tl.exp(m - m_new)

    @triton.jit
    def _decode_attention_split(q_ptr, k_new_ptr, v_new_ptr, k_ptr, v_ptr, pos_ptr, out_ptr, acc_ptr, max_ptr,
                                sum_ptr, stride_b, stride_h, n_head, max_len, split_len, scale,
                                HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK: tl.constexpr,
                                FIRST_BLOCK: tl.constexpr, AHEAD: tl.constexpr, LINE: tl.constexpr,
                                SPLIT: tl.constexpr, PDL: tl.constexpr):
        # One program: one (sequence, head) and the positions [start, start + split_len) that are <= pos, by an
        # online softmax. The new token's own key and value come from k_new, v_new: the program whose split holds
        # pos starts its softmax with them and writes them to the cache, and every program reads only the cached
        # positions before pos, so no program reads what another writes. SPLIT: write the unnormalised result
        # with its max and sum for the combine kernel; else there is one split and it writes the output.
        # Triton's ranges are powers of 2: a head of HEAD_DIM (96 in iGPT-L) is read as D_PAD lanes, masked.
        bh, split = tl.program_id(0), tl.program_id(1)
        d = tl.arange(0, D_PAD)
        in_head = d < HEAD_DIM
        # This kernel starts once the one it waits for is past its own wait, when all kernels before that one are
        # done: pos and the cache before pos are written by then, so the first block's loads go out before the wait.
        # That block is short (FIRST_BLOCK positions): at the early positions it is all there is to read, and a full
        # block's arithmetic on masked lanes cost ~2.5 us a layer there.
        pos = tl.load(pos_ptr)
        start = split * split_len
        end = tl.minimum(start + split_len, pos)  # a split wholly after pos reads nothing
        first = start + tl.arange(0, FIRST_BLOCK)
        first_valid = first < end
        first_ptrs = (bh * max_len + first[:, None]) * HEAD_DIM + d[None, :]
        k_first = tl.load(k_ptr + first_ptrs, mask=first_valid[:, None] & in_head[None, :], other=0.0)
        v_first = tl.load(v_ptr + first_ptrs, mask=first_valid[:, None] & in_head[None, :], other=0.0)
        if PDL:
            # The loop's first positions are asked for in L2 as well (LINE elements a 128-byte line), so the HBM
            # works while the product before finishes: AHEAD = 32 made a step at batch 64 2% faster on an H100;
            # 16 or 64 gained less, 128 nothing, and more asks from the products before attention nothing more.
            ahead = start + FIRST_BLOCK + tl.arange(0, AHEAD)
            lines = tl.arange(0, D_PAD // LINE) * LINE
            ahead_ptrs = (bh * max_len + tl.where(ahead < end, ahead, start)[:, None]) * HEAD_DIM \
                + tl.where(lines < HEAD_DIM, lines, 0)[None, :]
            _prefetch_to_l2(k_ptr + ahead_ptrs)
            _prefetch_to_l2(v_ptr + ahead_ptrs)
        _wait_for_inputs(PDL)
        row = (bh // n_head) * stride_b + (bh % n_head) * stride_h + d
        q = tl.load(q_ptr + row, mask=in_head, other=0.0).to(tl.float32) * scale
        cache = k_ptr.dtype.element_ty
        own = (start <= pos) & (pos < start + split_len)
        k_own = tl.load(k_new_ptr + row, mask=in_head, other=0.0)
        v_own = tl.load(v_new_ptr + row, mask=in_head, other=0.0)
        if own:
            tl.store(k_ptr + (bh * max_len + pos) * HEAD_DIM + d, k_own.to(cache), mask=in_head)
            tl.store(v_ptr + (bh * max_len + pos) * HEAD_DIM + d, v_own.to(cache), mask=in_head)
        k_own = k_own.to(cache).to(tl.float32)  # as the cache will hold it, so cached and full steps agree
        m = tl.where(own, tl.sum(k_own * q, 0), float("-inf"))
        total = tl.where(own, 1.0, 0.0)
        acc = tl.where(own, v_own.to(cache).to(tl.float32), 0.0)
        if start < end:  # else valid is empty, and a split after pos has nothing to add to
            m, p, rescale = _softmax_scores(q, k_first, first_valid, m)
            acc = acc * rescale + tl.sum(p[:, None] * v_first.to(tl.float32), 0)
            total = total * rescale + tl.sum(p, 0)
        # the loop counts from the split's start, from a constant: a loop from start + FIRST_BLOCK made a step at
        # batch 64 2.7% slower on average over the positions (3% at the last), on an H100
        for offset in range(FIRST_BLOCK, end - start, BLOCK):
            n = start + offset + tl.arange(0, BLOCK)
            valid = n < end
            ptrs = (bh * max_len + n[:, None]) * HEAD_DIM + d[None, :]
            k = tl.load(k_ptr + ptrs, mask=valid[:, None] & in_head[None, :], other=0.0)
            m, p, rescale = _softmax_scores(q, k, valid, m)
            # v is loaded after the scores, so k's and v's tiles are never in registers together (both at once
            # cost ~20% of the bandwidth)
            v = tl.load(v_ptr + ptrs, mask=valid[:, None] & in_head[None, :], other=0.0)
            acc = acc * rescale + tl.sum(p[:, None] * v.to(tl.float32), 0)
            total = total * rescale + tl.sum(p, 0)
        if SPLIT:
            out = bh * tl.num_programs(1) + split
            tl.store(acc_ptr + out * HEAD_DIM + d, acc, mask=in_head)
            tl.store(max_ptr + out, m)  # -inf where nothing was read: the combine gives it weight 0
            tl.store(sum_ptr + out, total)
        else:
            tl.store(out_ptr + bh * HEAD_DIM + d, (acc / total).to(out_ptr.dtype.element_ty), mask=in_head)

    @triton.jit
    def _decode_attention_combine(acc_ptr, max_ptr, sum_ptr, out_ptr, n_splits, HEAD_DIM: tl.constexpr,
                                  D_PAD: tl.constexpr, SPLITS: tl.constexpr, PDL: tl.constexpr):
        _wait_for_inputs(PDL)
        bh = tl.program_id(0)
        s = tl.arange(0, SPLITS)
        d = tl.arange(0, D_PAD)
        in_head = d < HEAD_DIM
        present = s < n_splits
        m = tl.load(max_ptr + bh * n_splits + s, mask=present, other=float("-inf"))
        w = tl.exp(m - tl.max(m, 0))  # the split holding pos read its own key, so the max is finite
        total = tl.sum(tl.load(sum_ptr + bh * n_splits + s, mask=present, other=0.0) * w, 0)
        acc = tl.load(acc_ptr + (bh * n_splits + s)[:, None] * HEAD_DIM + d[None, :],
                      mask=present[:, None] & in_head[None, :], other=0.0)
        tl.store(out_ptr + bh * HEAD_DIM + d, (tl.sum(acc * w[:, None], 0) / total).to(out_ptr.dtype.element_ty),
                 mask=in_head)


def _interpreted():
    """Whether Triton runs its kernels in the CPU interpreter (TRITON_INTERPRET=1), as the tests do."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def _hopper(device):
    """Whether device is a GPU with TMA and programmatic dependent launch (Hopper and newer)."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (9, 0)


def _pdl(device):
    """Launch options for programmatic dependent launch, on GPUs that have it."""
    return dict(PDL=_hopper(device), launch_pdl=_hopper(device))


def _pow2_block(n, largest):
    """The largest power of 2 that divides n, at most `largest`."""
    return min(largest, n & -n)


def norm_parts(x: torch.Tensor, gain: torch.Tensor):
    """What a fused product reads of a norm's input x [M, K]: x * gain, rounded as x is, and the sums of squares of
    x's rows [M, 1] in float32, so the product applies the norm's row scale after its loop (see fused_linear)."""
    xf = x.float()
    return (xf * gain.float()).to(x.dtype), xf.square().sum(1, keepdim=True)


def _thin(M):
    """Whether a product of M rows takes the thin Triton tiles; larger batches take cuBLAS, whose products beat
    thin tiles there while the extra kernels matter less."""
    return M <= 64


def _launch_linear(x, weight, row_sq, residual, next_gain, gelu, eps):
    # _fused_linear on thin tiles; returns out and, with next_gain, what the next norm reads of it
    M, K = x.shape
    N = weight.size(0)
    config = linear_config(M, N, K)
    grid = (triton.cdiv(M, config["BLOCK_M"]), N // config["BLOCK_N"])
    x, out = x.contiguous(), torch.empty(M, N, dtype=x.dtype, device=x.device)
    gained, out_sq = (torch.empty_like(out), out.new_empty(M, grid[1], dtype=torch.float32)) if next_gain is not None \
        else (out, out)  # placeholders the kernel never touches
    _fused_linear[grid](
        x, weight, x if row_sq is None else row_sq.contiguous(), None if residual is None else residual.contiguous(),
        next_gain, out, gained, out_sq, M, N, K, 1 if row_sq is None else row_sq.size(1), eps,
        NORM=row_sq is not None, GELU=gelu, RESIDUAL=residual is not None, NEXT_NORM=next_gain is not None,
        PARTS=1 if row_sq is None else triton.next_power_of_2(row_sq.size(1)),
        LINE=min(config["BLOCK_K"], 128 // weight.element_size()), **_pdl(x.device), **config)
    return out, gained, out_sq


def fused_linear(x, weight, row_sq=None, residual=None, gelu=False, eps=1e-5):
    """act(x @ weight.T * r) + residual in one kernel, for the thin products of a decode step: x [M, K],
    weight [N, K] (nn.Linear's), residual [M, N] or None, gelu: x * sigmoid(1.702 x). With row_sq the product
    is a norm's: x and row_sq are norm_parts of the norm's input, and r = rsqrt(mean of its squares + eps) (else
    r = 1). K and N must be multiples of 16. Batches of more than 64 rows take cuBLAS and plain ops instead, which
    torch.compile fuses."""
    if _thin(x.size(0)):
        return _thin_linear(x, weight, row_sq, residual, gelu, eps)
    h = F.linear(x, weight)
    if row_sq is not None:
        h = h * torch.rsqrt(row_sq.sum(1, keepdim=True) / x.size(1) + eps).to(h.dtype)
    h = activation(h) if gelu else h
    return h if residual is None else h + residual


def residual_linear(x, weight, residual, next_gain):
    """An update of the residual stream in one kernel: out = residual + x @ weight.T, returned with what the next
    norm (gain next_gain) reads of it, out * next_gain and partial sums of squares of its rows [M, P], which
    P tiles of columns write side by side (norm_parts gives the same with P = 1). Batches of more than 64 rows:
    cuBLAS and plain ops."""
    if _thin(x.size(0)):
        return _thin_residual_linear(x, weight, residual, next_gain)
    out = F.linear(x, weight) + residual
    return (out, *norm_parts(out, next_gain))


# The Triton paths as custom ops: torch.compile calls each as one opaque launch instead of tracing the launcher.

@torch.library.custom_op("igpt::thin_linear", mutates_args=())
def _thin_linear(x: torch.Tensor, weight: torch.Tensor, row_sq: Optional[torch.Tensor],
                 residual: Optional[torch.Tensor], gelu: bool, eps: float) -> torch.Tensor:
    return _launch_linear(x, weight, row_sq, residual, None, gelu, eps)[0]


@_thin_linear.register_fake
def _(x, weight, row_sq, residual, gelu, eps):
    return x.new_empty(x.size(0), weight.size(0))


@torch.library.custom_op("igpt::thin_residual_linear", mutates_args=())
def _thin_residual_linear(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor,
                          next_gain: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _launch_linear(x, weight, None, residual, next_gain, False, 0.0)  # eps is only read with a norm


@_thin_residual_linear.register_fake
def _(x, weight, residual, next_gain):
    M, K = x.shape
    N = weight.size(0)
    parts = N // linear_config(M, N, K)["BLOCK_N"]
    return x.new_empty(M, N), x.new_empty(M, N), x.new_empty(M, parts, dtype=torch.float32)


def linear_config(M, N, K):
    """Tile sizes and launch options of fused_linear for an [M, K] x [K, N] product, M <= 64. Narrow products
    (N <= 512: the projections back into the residual stream) take thin tiles of 16 rows that spread the weight's
    reads over many programs; the wide ones (qkv, c_fc) tiles of all 64 rows, which read each weight tile once.
    The fastest in chains of 96 kernels on an H100 of 143 choices (tile sizes, warps, stages) for each product of
    iGPT-S at M = 64: 2.4-4.4 us each."""
    if N <= 512:
        return dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=_pow2_block(K, 256), num_warps=2, num_stages=3)
    return dict(BLOCK_M=min(64, max(16, triton.next_power_of_2(M))), BLOCK_N=_pow2_block(N, 32),
                BLOCK_K=_pow2_block(K, 128), num_warps=4, num_stages=4)


# The fastest on an H100 of the tile shapes, warp counts, stages and row groupings tried for iGPT-S's c_fc at
# 262,144 rows: 1.17 ms, against 1.57 ms for cuBLAS's product and a separate activation (bench.py linear_gelu).
LINEAR_GELU_CONFIG = dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=4, num_warps=8, num_stages=3)


@torch.library.custom_op("igpt::linear_gelu", mutates_args=())
def linear_gelu(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """activation(x @ weight.T) for x [M, K] and weight [N, K] (nn.Linear's), the activation applied before the
    product leaves the chip: in inference the MLP's hidden layer, four times the width of the residual stream, is
    written once and never read back for a separate pass. A Triton kernel on GPUs with TMA (Hopper and newer;
    K and N multiples of 8 for 16-bit rows), cuBLAS and a separate activation elsewhere."""
    M, K = x.shape
    N = weight.size(0)
    if (triton is None or not (_interpreted() or _hopper(x.device))
            or (K * x.element_size()) % 16 or (N * x.element_size()) % 16):
        return activation(F.linear(x, weight))
    x, weight = x.contiguous(), weight.to(x.dtype).contiguous()
    out = torch.empty(M, N, dtype=x.dtype, device=x.device)
    c = LINEAR_GELU_CONFIG
    tiles = triton.cdiv(M, c["BLOCK_M"]) * triton.cdiv(N, c["BLOCK_N"])
    programs = min(tiles, 4 if _interpreted() else torch.cuda.get_device_properties(x.device).multi_processor_count)
    _linear_gelu[(programs,)](
        TensorDescriptor.from_tensor(x, [c["BLOCK_M"], c["BLOCK_K"]]),
        TensorDescriptor.from_tensor(weight, [c["BLOCK_N"], c["BLOCK_K"]]),
        TensorDescriptor.from_tensor(out, [c["BLOCK_M"], c["BLOCK_N"]]), M, N, K, PROGRAMS=programs, **c)
    return out


@linear_gelu.register_fake
def _(x, weight):
    return x.new_empty(x.size(0), weight.size(0))


@torch.library.custom_op("igpt::decode_attention", mutates_args=("k_cache", "v_cache"))
def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                     v_cache: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """One decode step of attention: write the new keys and values k, v [B, H, D] into the caches [B, H, T, D]
    (contiguous) at position pos, and return softmax(q k^T / sqrt(D)) v over positions 0..pos for the queries
    q [B, H, D] (q, k, v may be strided views of one qkv tensor; their last dimension is contiguous). pos is a [1]
    tensor read on the device: no host synchronisation and one shape for every step, so a whole step is captured
    once as a CUDA graph, and only the filled part of the cache is read."""
    B, H, D = q.shape
    T, d_pad = k_cache.size(2), triton.next_power_of_2(D)
    block = min(DECODE_BLOCK, DECODE_TILE // d_pad)
    blocks = triton.cdiv(T, block)
    split_len = block * triton.cdiv(blocks, min(blocks, triton.cdiv(DECODE_PROGRAMS, B * H)))
    n_splits = triton.cdiv(T, split_len)
    # a short first block pays where all programs run at once and a step waits on each one's latency; in several
    # waves of programs it only costs (iGPT-L at batch 128: 12% slower)
    first_block = min(DECODE_FIRST_BLOCK, block) if B * H * n_splits <= DECODE_PROGRAMS else block
    out = torch.empty(B, H, D, dtype=q.dtype, device=q.device)
    partial = [torch.empty(B * H, n_splits, *shape, dtype=torch.float32, device=q.device)
               for shape in ([D], [], [])] if n_splits > 1 else [out] * 3  # placeholders a single split never uses
    _decode_attention_split[(B * H, n_splits)](
        q, k, v, k_cache, v_cache, pos, out, *partial, q.stride(0), q.stride(1), H, T, split_len, D ** -0.5,
        HEAD_DIM=D, D_PAD=d_pad, BLOCK=block, FIRST_BLOCK=first_block, AHEAD=DECODE_AHEAD,
        LINE=min(d_pad, 128 // k_cache.element_size()), SPLIT=n_splits > 1,
        num_warps=DECODE_WARPS * (1 if D == d_pad else 2), **_pdl(q.device))
    if n_splits > 1:
        _decode_attention_combine[(B * H,)](*partial, out, n_splits, HEAD_DIM=D, D_PAD=d_pad,
                                            SPLITS=triton.next_power_of_2(n_splits), **_pdl(q.device))
    return out


@decode_attention.register_fake
def _(q, k, v, k_cache, v_cache, pos):
    return q.new_empty(q.shape)


def fused_decode_block(block, x, x_gained, x_sq, next_gain, input_pos, rows=slice(None)):
    """A block's decode step in the five kernels above: x is the residual stream [B, n_embd] of the new tokens and
    x_gained, x_sq the norm_parts ln_1 reads of it; rows of block.attn.kv_cache receive their keys and values at
    input_pos. Returns the new residual stream with the parts that the next norm, of gain next_gain, reads."""
    B, C = x.shape
    attn, cache = block.attn, block.attn.kv_cache
    qkv = fused_linear(x_gained, attn.c_attn.weight, x_sq, None, False, block.ln_1.eps)
    q, k, v = qkv.view(B, 3, attn.n_head, C // attn.n_head).unbind(1)
    y = decode_attention(q, k, v, cache.k[rows], cache.v[rows], input_pos).view(B, C)
    x, x_gained, x_sq = residual_linear(y, attn.c_proj.weight, x, block.ln_2.g)
    h = fused_linear(x_gained, block.mlp.c_fc.weight, x_sq, None, True, block.ln_2.eps)
    return residual_linear(h, block.mlp.c_proj.weight, x, next_gain)


def fused_decode(model, x, x_gained, x_sq, input_pos, rows=slice(None)):
    """The blocks and the head of a decode step in the fused kernels: logits [B, n_vocab] (in the model's dtype)
    for the residual stream x [B, n_embd] of the new tokens, given the norm_parts that ln_1 reads of it; their
    keys and values go to the rows `rows` of the KV caches."""
    next_norms = [block.ln_1 for block in model.h[1:]] + [model.ln_f]
    for block, next_norm in zip(model.h, next_norms):
        x, x_gained, x_sq = fused_decode_block(block, x, x_gained, x_sq, next_norm.g, input_pos, rows)
    return fused_linear(x_gained, model.wtet.weight, x_sq, None, False, model.ln_f.eps)


_side_streams = {}  # device -> the stream of fused_decode_halves' second half


@torch.compiler.disable  # torch.compile does not trace streams: a compiled step calls this between its own kernels
def fused_decode_halves(model, x, x_gained, x_sq, input_pos):
    """fused_decode as two chains of half the batch each, the second on a stream of its own (on the CPU, one after
    the other). One chain's kernels run one after another, so at late positions the HBM idles during the products
    while attention waits for them; with two chains one half's products run beside the other half's attention. It
    costs the second chain's kernels, so it pays only where attention reads much of the cache (see _halves_from).
    The logits are those of one chain where the products of half the rows take the same tiles (iGPT-S at batch
    64: exactly)."""
    first, second = slice(0, x.size(0) // 2), slice(x.size(0) // 2, None)
    run = lambda rows: fused_decode(model, x[rows], x_gained[rows], x_sq[rows], input_pos, rows)
    if not x.is_cuda:
        return torch.cat([run(first), run(second)])
    main = torch.cuda.current_stream(x.device)
    if x.device not in _side_streams:
        _side_streams[x.device] = torch.cuda.Stream(x.device)
    side = _side_streams[x.device]
    side.wait_stream(main)
    with torch.cuda.stream(side):
        second_logits = run(second)
    first_logits = run(first)
    main.wait_stream(side)
    second_logits.record_stream(main)  # made on the side stream, read on this one
    return torch.cat([first_logits, second_logits])


# ---- sampling ----

def sample_from_logits(logits, uniform, temperature=1.0, top_k=None, top_p=None):
    """Draw one token per row of logits [B, V] with the Gumbel-max trick, using the given uniform noise [B, V].

    Taking the noise as an argument keeps the draw a pure function: a compiled decode step never touches the
    random generator, and cached and uncached generation draw exactly the same tokens from the same noise."""
    logits = logits.float() / max(temperature, 1e-5)
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, -float("inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop_sorted = cum - sorted_logits.softmax(dim=-1) >= top_p  # keep the smallest prefix reaching top_p
        logits = logits.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), -float("inf"))
    gumbel = -torch.log(-torch.log(uniform.clamp(1e-20, 1.0 - 1e-7)))
    return torch.argmax(logits + gumbel, dim=-1)


def _sample_step(model, tokens, noise, pos, temperature, top_k, top_p, halves):
    # One token for every sequence, in place and on the device: tokens[:, pos] is drawn from the logits after
    # tokens[:, pos - 1] (sos at pos 0) with the noise noise[pos], then pos moves on. Nothing comes from the host,
    # so a CUDA graph of this step (one for each value of halves) is replayed unchanged for every position.
    logits = model.decode_step(tokens.index_select(1, (pos - 1).clamp(min=0))[:, 0], pos, halves)
    drawn = sample_from_logits(logits, noise.index_select(0, pos)[0], temperature, top_k, top_p)
    tokens.index_copy_(1, pos, drawn[:, None])
    pos += 1


_compiled_step = None


def _compiled_sample_step():
    global _compiled_step
    if _compiled_step is None:  # one compile per process: the embedding, norms and sampling fuse into few kernels
        # The step in halves breaks the graph at fused_decode_halves, inside decode_step. Where torch has nested
        # graph breaks (2.11 does), the parts before and after it stay two graphs, not six: 4 ms less for 64 images.
        _compiled_step = torch.compile(_sample_step, dynamic=False)
        if hasattr(torch._dynamo.config, "nested_graph_breaks"):
            _compiled_step = torch._dynamo.config.patch(nested_graph_breaks=True)(_compiled_step)
    return _compiled_step


def _cuda_graph(step, pos):
    """step() captured as a CUDA graph, so a replay launches all its kernels for a few microseconds of host time.
    Capture needs one real call first (lazy initialisation, compilation): it does what the first replay will do
    again, so only pos is set back."""
    start = pos.clone()
    graph, side = torch.cuda.CUDAGraph(), torch.cuda.Stream(pos.device)
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
        pos.copy_(start)
        graph.capture_begin()  # not torch.cuda.graph(), which empties the allocator's cache on every capture
        try:
            step()
        finally:
            graph.capture_end()
    torch.cuda.current_stream().wait_stream(side)
    return graph.replay


def _halves_from(model, batch_size):
    """The first position whose generation step runs in halves (fused_decode_halves), block_size for none. On an H100
    halves paid for iGPT-S at batch 64 from position ~690 (6% faster a step at 1023) and at batch 32 (9% at
    640-704), little at batch 16 and not at 8, and for iGPT-M at batch 64 at no position (its products are four
    times larger): so batches of 32-64 of widths up to 512 run their last third in halves."""
    c = model.config
    if c.n_embd > 512 or batch_size % 2 or not 32 <= batch_size <= 64 or not model.can_fuse_decode(model.wte.weight):
        return c.block_size
    return c.block_size * 2 // 3


@dataclass
class _Sampler:
    """What generate's steps read and write, kept with the model between calls: a CUDA graph replays fixed
    addresses, so a call that finds the same settings, weights and cache replays the graphs of the last one
    instead of capturing its own (~30 ms for 64 iGPT-S images)."""
    key: tuple
    tokens: torch.Tensor  # [B, T]: the prime, then each drawn token
    noise: torch.Tensor   # [T, B, n_vocab]: row i draws position i
    pos: torch.Tensor     # [1]: the position the next step draws
    steps: dict = field(default_factory=dict)  # halves (bool) -> the step, a captured graph's replay on a GPU


_samplers = weakref.WeakKeyDictionary()  # model -> its _Sampler; setup_kv_cache drops the model's entry


def _sampler(model, batch_size, *settings):
    """The model's _Sampler for these settings, with a KV cache for batch_size sequences: the last call's when the
    settings and the addresses of the weights and the cache (what a graph replays) are unchanged, else a new one."""
    device, T, V = model.wte.weight.device, model.config.block_size, model.config.n_vocab
    caches = [block.attn.kv_cache for block in model.h]
    if any(c is None or c.k.shape[0] != batch_size or c.k.dtype != model.wte.weight.dtype or c.k.device != device
           for c in caches):
        model.setup_kv_cache(batch_size)
        caches = [block.attn.kv_cache for block in model.h]
    key = (batch_size, *settings, *(t.data_ptr() for t in model.parameters()),
           *(t.data_ptr() for c in caches for t in (c.k, c.v)))
    sampler = _samplers.get(model)
    if sampler is None or sampler.key != key:
        sampler = _samplers[model] = _Sampler(key, torch.zeros(batch_size, T, dtype=torch.long, device=device),
                                              torch.empty(T, batch_size, V, device=device),
                                              torch.zeros(1, dtype=torch.long, device=device))
    return sampler


@torch.no_grad()
def generate(model, num_samples=None, prime=None, temperature=1.0, top_k=None, top_p=None, generator=None,
             compile=False, progress=None):
    """Sample images as tokens [B, n_px*n_px] (int64) with a KV cache.

    prime: optional [B, P] tokens to keep and continue (completions); else num_samples unconditional images.
    generator: the torch.Generator (on the model's device) that draws all noise up front, so one seed gives the
    same images on one device. compile: run the one-token step through torch.compile. On a GPU the step is one
    CUDA graph, replayed for every position with no host synchronisation; the late positions of batches of 32-64
    replay a second one, the step in halves (see _halves_from). progress: called as progress(done, total).

    The KV cache, the noise and the graphs stay with the model for the next call with the same batch size and
    settings, which skips the capture; `model.setup_kv_cache(None)` frees them."""
    device = model.wte.weight.device
    T = model.config.block_size
    if prime is None:
        if not num_samples:
            raise ValueError("give num_samples or prime")
        prime = torch.zeros(num_samples, 0, dtype=torch.long, device=device)
    prime = prime.to(device=device, dtype=torch.long)
    B, P = prime.shape
    if P >= T:
        raise ValueError(f"prime has {P} tokens; it must be shorter than the {T} of an image")
    s = _sampler(model, B, temperature, top_k, top_p, compile)
    torch.rand(T - P, B, model.config.n_vocab, generator=generator, device=device, out=s.noise[P:])
    s.tokens[:, :P] = prime  # the positions after P are each written before they are read
    s.pos.fill_(P)
    if P > 0:  # positions 0..P-1 into the cache (the logits returned, of x_{P-1}, are the prime's to give)
        model.prefill(prime[:, :P - 1])
    step_fn = _compiled_sample_step() if compile else _sample_step
    halves_from = _halves_from(model, B)
    for i in range(P, T):
        halves = i >= halves_from
        if halves not in s.steps:
            step = lambda halves=halves: step_fn(model, s.tokens, s.noise, s.pos, temperature, top_k, top_p, halves)
            s.steps[halves] = _cuda_graph(step, s.pos) if device.type == "cuda" else step
        s.steps[halves]()
        if progress is not None:
            progress(i + 1, T)
    return s.tokens.clone()


# ---- the checkpoint format: a .pt holding {"config": dict, "model": state_dict, "palette": tensor | None, ...} ----

def save_checkpoint(path, model=None, palette=None, **extra):
    """Write a checkpoint atomically (temp file in the same folder, then rename), so an interrupted write never
    leaves a broken file in place of a good one. extra entries (optimizer state, step, ...) are stored beside."""
    obj = dict(extra)
    if model is not None:
        model = getattr(model, "_orig_mod", model)  # unwrap torch.compile
        obj["config"] = asdict(model.config)
        obj["model"] = model.state_dict()
    if palette is not None:
        obj["palette"] = torch.as_tensor(palette, dtype=torch.float32)
    atomic_write(path, lambda f: torch.save(obj, f))


def load_checkpoint(path, map_location="cpu"):
    """Read a checkpoint written by save_checkpoint, with weights_only=True (no code runs from the file)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint at {path!r}; for the original TF release run convert.py first")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        raise ValueError(f"{path!r} is not a readable igpt checkpoint ({e})") from e
    if not isinstance(ckpt, dict) or "config" not in ckpt or "model" not in ckpt:
        raise ValueError(f"{path!r} is not an igpt checkpoint: it lacks 'config' and 'model' "
                         "(an original TF checkpoint needs convert.py)")
    known = {f.name for f in fields(IGPTConfig)}
    unknown = set(ckpt["config"]) - known
    if unknown:
        raise ValueError(f"{path!r} has config fields this version does not know: {sorted(unknown)}")
    return ckpt

"""
The fast paths beside the model: KV-cached sampling with the decode step in fused GPU kernels (kernels.py),
captured once as a CUDA graph and replayed for every position; and the MLP with its activation fused into its
first product, for 16-bit inference over whole sequences (probe features).

    from engine import Engine, fuse_mlp
    engine = Engine(model)                         # the fused step where it runs (a GPU), else the plain path
    tokens = engine.generate(num_samples=64)       # [64, n_px*n_px] int64
    tokens = engine.generate(num_samples=64)       # replays what the first call captured
    del engine                                     # frees the KV cache, the buffers and the graphs
    Engine(model, fast=False).generate(...)        # igpt.generate, the plain reference, through the same door

igpt.generate is the reference: given generators in the same state, both paths draw the same tokens, except where
the last bits of the logits, which the fused kernels sum in another order, tip a near tie.

A step. It embeds the previous token (sos at position 0), runs each block as five kernels and the head as one,
draws a token with the noise drawn for that position up front, writes it in place and advances the position, all
on the device. With nothing coming from the host, one CUDA graph of the step serves every position.

What the engine keeps. A graph replays fixed addresses, so the KV cache, the token and noise buffers and the graphs
stay in the engine for its next call with the same batch size and settings, which skips the capture; other settings,
or weights replaced rather than updated in place, build them anew. Nothing stays with the model.
"""
import contextlib
from dataclasses import dataclass
from typing import Callable, Optional

import torch

import kernels
from igpt import MLP, KVCache, generate as plain_generate, prime_tokens, sample_from_logits


def fused_step_runs(model) -> bool:
    """Whether the fused decode step can run for this model where its weights are: the kernels on that device
    (kernels.runs_on), and widths and palettes in multiples of 16 (the products' tiles)."""
    c = model.config
    return kernels.runs_on(model.wte.weight.device) and c.n_embd % 16 == 0 and c.n_vocab % 16 == 0


# ---- the decode step in fused kernels ----

def fused_decode_block(block, cache, x, x_gained, x_sq, next_gain, input_pos):
    """One block's step in five kernels: x [B, n_embd] is the residual stream of the new tokens, x_gained and x_sq
    the norm_parts that ln_1 reads of it; the cache receives the new keys and values at input_pos.
    Returns the new residual stream with the parts that the next norm, of gain next_gain, reads of it."""
    B, C = x.shape
    attn = block.attn
    qkv = kernels.fused_linear(x_gained, attn.c_attn.weight, x_sq, None, False, block.ln_1.eps)
    q, k, v = qkv.view(B, 3, attn.n_head, C // attn.n_head).unbind(1)  # each [B, n_head, head_dim]
    y = kernels.decode_attention(q, k, v, cache.k, cache.v, input_pos).view(B, C)
    x, x_gained, x_sq = kernels.residual_linear(y, attn.c_proj.weight, x, block.ln_2.g)
    h = kernels.fused_linear(x_gained, block.mlp.c_fc.weight, x_sq, None, True, block.ln_2.eps)
    return kernels.residual_linear(h, block.mlp.c_proj.weight, x, next_gain)


def fused_decode(model, caches, x, input_pos):
    """The blocks and the head for the inputs x [B, n_embd] at position input_pos: logits [B, n_vocab] in the
    model's dtype. Keys and values go to the caches, one KVCache a block."""
    x_gained, x_sq = kernels.norm_parts(x, model.h[0].ln_1.g)
    next_norms = [block.ln_1 for block in model.h[1:]] + [model.ln_f]
    for block, cache, next_norm in zip(model.h, caches, next_norms):
        x, x_gained, x_sq = fused_decode_block(block, cache, x, x_gained, x_sq, next_norm.g, input_pos)
    return kernels.fused_linear(x_gained, model.wtet.weight, x_sq, None, False, model.ln_f.eps)


def _sample_step(model, caches, tokens, noise, pos, temperature, top_k, top_p):
    # One token for every sequence, in place and on the device: tokens[:, pos] is drawn from the logits after
    # tokens[:, pos - 1] (sos at pos 0) with the noise noise[pos], then pos moves on. Nothing comes from the host,
    # so a CUDA graph of this step is replayed unchanged for every position.
    x = model.embed_next(tokens.index_select(1, (pos - 1).clamp(min=0))[:, 0], pos)[:, 0]
    logits = fused_decode(model, caches, x, pos)
    drawn = sample_from_logits(logits, noise.index_select(0, pos)[0], temperature, top_k, top_p)
    tokens.index_copy_(1, pos, drawn[:, None])
    pos += 1


_compiled_step = None


def _compiled_sample_step():
    global _compiled_step
    if _compiled_step is None:  # one compile per process: the embedding, norms and the draw fuse into few kernels
        _compiled_step = torch.compile(_sample_step, dynamic=False, fullgraph=True)
    return _compiled_step


def _cuda_graph(step, pos):
    """step() captured as a CUDA graph, so one replay launches all its kernels at the host cost of one launch.
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


@contextlib.contextmanager
def _lent(model, caches):
    """The engine's caches in the model's attention layers for the duration, so the plain prefill fills them."""
    before = [block.attn.kv_cache for block in model.h]
    for block, cache in zip(model.h, caches):
        block.attn.kv_cache = cache
    try:
        yield
    finally:
        for block, cache in zip(model.h, before):
            block.attn.kv_cache = cache


@dataclass
class _Buffers:
    """What the steps read and write, at fixed addresses for the graphs."""
    key: tuple
    caches: list          # a KVCache a block
    tokens: torch.Tensor  # [B, T]: the prime, then each drawn token
    noise: torch.Tensor   # [T, B, n_vocab]: row i draws position i
    pos: torch.Tensor     # [1]: the position the next step draws
    step: Optional[Callable] = None  # the step, a captured graph's replay on a GPU


class Engine:
    """Sampling from one model through the fused step where it runs, else through igpt.generate.

    fast: "auto" (the fused step on a GPU where fused_step_runs), True (the fused step, also in Triton's CPU
    interpreter, or an error saying why it cannot run), False (the plain path). compile: torch.compile the step
    (default: on a GPU). The engine keeps its buffers and graphs between calls; drop it to free them."""

    def __init__(self, model, fast="auto", compile=None):
        runs = fused_step_runs(model)
        if fast is True and not runs:
            raise ValueError("the fused decode step needs a GPU with Triton 3.4+ (or TRITON_INTERPRET=1) and "
                             "n_embd and n_vocab in multiples of 16; use the plain path (fast=False)")
        on_gpu = model.wte.weight.is_cuda
        self.model = model
        self.fast = runs and on_gpu if fast == "auto" else bool(fast)
        self.compile = on_gpu if compile is None else compile
        self._buffers = None

    @torch.no_grad()
    def generate(self, num_samples=None, prime=None, temperature=1.0, top_k=None, top_p=None, generator=None,
                 progress=None):
        """Tokens [B, n_px*n_px] (int64): num_samples unconditional images, or completions of prime [B, P]. The
        arguments are igpt.generate's."""
        model = self.model
        if not self.fast:
            return plain_generate(model, num_samples, prime, temperature, top_k, top_p, generator, self.compile,
                                  progress)
        T, V = model.config.block_size, model.config.n_vocab
        prime = prime_tokens(model, num_samples, prime)
        B, P = prime.shape
        s = self._buffers_for(B, (temperature, top_k, top_p))
        torch.rand(T - P, B, V, generator=generator, device=prime.device, out=s.noise[P:])
        s.tokens[:, :P] = prime  # the positions after P are each written before they are read
        s.pos.fill_(P)
        if P > 0:  # positions 0..P-1 into the cache (the logits returned, of x_{P-1}, are the prime's to give)
            with _lent(model, s.caches):
                model.prefill(prime[:, :P - 1])
        if s.step is None:
            step_fn = _compiled_sample_step() if self.compile else _sample_step
            step = lambda: step_fn(model, s.caches, s.tokens, s.noise, s.pos, temperature, top_k, top_p)
            s.step = _cuda_graph(step, s.pos) if s.pos.is_cuda else step
        for i in range(P, T):
            s.step()
            if progress is not None:
                progress(i + 1, T, s.tokens)
        return s.tokens.clone()

    def _buffers_for(self, batch_size, settings):
        """The last call's buffers when the batch size, settings and the addresses of the weights (what a graph
        replays) are unchanged, else new ones (the old freed first)."""
        model = self.model
        weight = model.wte.weight
        key = (batch_size, *settings, weight.dtype, *(p.data_ptr() for p in model.parameters()))
        if self._buffers is None or self._buffers.key != key:
            self._buffers = None
            c = model.config
            caches = [KVCache(batch_size, c.n_head, c.block_size, c.n_embd // c.n_head, weight.dtype, weight.device)
                      for _ in model.h]
            self._buffers = _Buffers(key, caches, torch.zeros(batch_size, c.block_size, dtype=torch.long,
                                                              device=weight.device),
                                     torch.empty(c.block_size, batch_size, c.n_vocab, device=weight.device),
                                     torch.zeros(1, dtype=torch.long, device=weight.device))
        return self._buffers


# ---- the MLP with its activation in the product's epilogue ----

class FusedMLP(MLP):
    """An MLP whose activation runs in the epilogue of its first product (kernels.linear_gelu), in 16-bit inference
    on the GPU; elsewhere (training, float32, the CPU) it is the MLP it replaces. It holds that MLP's own c_fc and
    c_proj, so the state dict is unchanged."""

    def __init__(self, mlp):
        torch.nn.Module.__init__(self)
        self.c_fc, self.c_proj = mlp.c_fc, mlp.c_proj

    def forward(self, x):
        if not x.is_cuda or x.dtype not in (torch.bfloat16, torch.float16) or torch.is_grad_enabled():
            return super().forward(x)
        return self.c_proj(kernels.linear_gelu(x.flatten(0, -2), self.c_fc.weight).view(*x.shape[:-1], -1))


def fuse_mlp(model):
    """Swap every block's MLP for a FusedMLP of the same weights, in place; returns the model."""
    for block in model.h:
        if not isinstance(block.mlp, FusedMLP):
            block.mlp = FusedMLP(block.mlp)
    return model

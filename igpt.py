"""
Image GPT (Chen et al. 2020, "Generative Pretraining from Pixels"): the whole model in one file.

An image is n_px*n_px palette indices in raster order (palette.py turns pixels into them). The network is GPT-2
with the original's changes: a norm that does not subtract the mean (gain only), x*sigmoid(1.702x), no biases, a
learned start-of-sequence vector `sos` in front of the shifted token embeddings, and an untied, zero-initialised
output head `wtet`. Position i reads [sos, x_0, ..., x_{i-1}] and predicts x_i.

The paper's other objective, BERT (IGPTConfig(bert=True)), is the same network without `sos` and without the
causal mask: a random 15% of positions (bert_mask_prob) have their token embedding zeroed, every position attends to
every other, and the loss is the cross-entropy at the masked positions.

    model = IGPT(IGPTConfig.preset("s"))
    logits, loss = model(tokens)                     # tokens: [B, n_px*n_px] int64, loss in nats per token
    tokens = generate(model, num_samples=8)          # KV-cached sampling, plain PyTorch
    feats = model.features(tokens, layers=[12])      # linear-probe features, [B, 1, n_embd]
    bert = IGPT(IGPTConfig.preset("s", bert=True))
    logits, loss = bert(tokens, mask=mask)           # mask: bool [B, n_px*n_px], True where hidden and scored

Also here: KV-cached generation in the style of gpt-fast (a static cache, prefill, a one-token step, the draw),
the checkpoint format (save_checkpoint, IGPT.from_checkpoint), and configure_optimizers and estimate_mfu as in
nanoGPT. The fast paths (fused GPU kernels, CUDA graphs) live beside this file in engine.py, which imports it.
"""
import inspect
import math
import os
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from common import first_nonfinite, load_verified, save_verified

PRESETS = {  # the paper's models: n_embd, n_head, n_layer (76M, 455M, 1.4B, 6.8B parameters); s, m, l were released
    "s": dict(n_embd=512, n_head=8, n_layer=24),
    "m": dict(n_embd=1024, n_head=8, n_layer=36),
    "l": dict(n_embd=1536, n_head=16, n_layer=48),
    "xl": dict(n_embd=3072, n_head=24, n_layer=60),  # the paper gives no head count: 24 heads of 128, as M's
}


@dataclass
class IGPTConfig:
    n_px: int = 32        # images are n_px x n_px, so sequences are n_px**2 tokens long
    n_vocab: int = 512    # palette size
    n_embd: int = 512
    n_head: int = 8
    n_layer: int = 24
    n_classes: int = 0    # > 0 adds the fine-tuning classifier on the mean-pooled final features
    bert: bool = False    # the BERT objective: masked positions predicted with bidirectional attention
    bert_mask_prob: float = 0.15  # with bert: the chance that each position is masked

    def __post_init__(self):
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}: each head takes "
                             "n_embd/n_head channels, so pick n_embd a multiple of n_head")
        if not 0 < self.bert_mask_prob < 1:
            raise ValueError(f"bert_mask_prob={self.bert_mask_prob} must lie strictly between 0 and 1")

    @property
    def block_size(self) -> int:
        return self.n_px * self.n_px

    @classmethod
    def preset(cls, name: str, **overrides) -> "IGPTConfig":
        """A size of the paper ("s", "m", "l", "xl") with any field overridden, e.g. preset("s", n_px=48)."""
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


class SelfAttention(nn.Module):
    def __init__(self, config: IGPTConfig):
        super().__init__()
        self.n_head = config.n_head
        self.causal = not config.bert  # BERT attends both ways: nothing it reads is the token it predicts
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=False)  # q, k, v in one matmul
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=False)
        self.kv_cache = None  # a KVCache for generation, used by the calls that pass input_pos

    def forward(self, x, input_pos=None):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).view(B, T, 3, self.n_head, C // self.n_head).permute(2, 0, 3, 1, 4)  # (B, nh, T, hs)
        if input_pos is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        else:  # generating: attend to the cached positions up to each query's own
            k, v = self.kv_cache.update(input_pos, k, v)
            mask = input_pos[:, None] >= torch.arange(k.size(2), device=x.device)  # (T, max_len)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, C))  # the heads side by side again


def activation(x):
    """The original's activation: x * sigmoid(1.702 x), a sigmoid approximation of GELU."""
    return x * torch.sigmoid(1.702 * x)


class MLP(nn.Module):
    def __init__(self, config: IGPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=False)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=False)

    def forward(self, x):
        return self.c_proj(activation(self.c_fc(x)))


class Block(nn.Module):
    def __init__(self, config: IGPTConfig):
        super().__init__()
        self.ln_1 = Norm(config.n_embd)
        self.attn = SelfAttention(config)
        self.ln_2 = Norm(config.n_embd)
        self.mlp = MLP(config)

    def forward(self, x, input_pos=None):
        x = x + self.attn(self.ln_1(x), input_pos)
        return x + self.mlp(self.ln_2(x))


class IGPT(nn.Module):
    def __init__(self, config: IGPTConfig):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.n_vocab, config.n_embd)
        self.wpe = nn.Embedding(config.block_size, config.n_embd)
        self.sos = None if config.bert else nn.Parameter(torch.empty(config.n_embd))  # BERT has no shift
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
        if self.sos is not None:
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

    def get_num_params(self, non_embedding=False) -> int:
        """The parameter count; non_embedding=True leaves out the tables read a row at a time (wte, wpe, sos),
        which cost no multiplies."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.wte.weight.numel() + self.wpe.weight.numel() + (0 if self.sos is None else self.sos.numel())
        return n

    def embed(self, tokens, mask=None):
        """Inputs to the first block, + wpe: [sos, wte[x_0], ..., wte[x_{T-2}]], so position i predicts x_i; or for
        BERT wte[x_i] with the masked positions' zeroed, so position i predicts x_i from the rest of the image."""
        B, T = tokens.shape
        if T > self.config.block_size:
            raise ValueError(f"sequence of {T} tokens is longer than the model's {self.config.block_size}")
        if self.config.bert:
            h = self.wte(tokens).masked_fill(mask[..., None], 0.0)
        else:
            h = torch.cat([self.sos.expand(B, 1, -1), self.wte(tokens[:, :-1])], dim=1)
        return h + self.wpe.weight[:T]

    def _bert_mask(self, tokens, mask):
        """The mask a call reads: None for an autoregressive model, for BERT the one given or else a fresh draw,
        each position masked with probability bert_mask_prob."""
        if not self.config.bert:
            if mask is not None:
                raise ValueError("mask is for BERT models: an autoregressive one reads every token before the one "
                                 "it predicts; call it without mask")
            return None
        if mask is None:
            return torch.rand(tokens.shape, device=tokens.device) < self.config.bert_mask_prob
        if mask.shape != tokens.shape or mask.dtype != torch.bool:
            raise ValueError(f"mask must be a bool tensor shaped like the tokens {list(tokens.shape)}, got "
                             f"{mask.dtype} {list(mask.shape)}")
        return mask

    def hidden(self, tokens, mask=None):
        """Final normalised hidden states [B, T, n_embd]; mask as in forward."""
        h = self.embed(tokens, self._bert_mask(tokens, mask))
        for block in self.h:
            h = block(h)
        return self.ln_f(h)

    def generative_loss(self, logits, tokens, mask=None):
        """The generative loss in nats: the mean cross-entropy over every position; for BERT (mask given) the mean
        over each image's masked positions, then over the images, as the original computes (an image with no
        masked position, where the original divides by zero, counts 0)."""
        ce = F.cross_entropy(logits.float().flatten(0, 1), tokens.flatten(), reduction="none").view(tokens.shape)
        if mask is None:
            return ce.mean()
        return ((ce * mask).sum(1) / mask.sum(1).clamp(min=1)).mean()

    def forward(self, tokens, mask=None):
        """logits [B, T, n_vocab] where position i predicts tokens[:, i], and the generative loss. mask (BERT only):
        bool [B, T], True where the input is hidden and the prediction scored; None draws one."""
        mask = self._bert_mask(tokens, mask)
        logits = self.wtet(self.hidden(tokens, mask))
        return logits, self.generative_loss(logits, tokens, mask)

    def classify(self, tokens, mask=None):
        """Fine-tuning: class logits from the mean-pooled final features, and the generative loss beside them
        (mask as in forward: a BERT model is fine-tuned on masked inputs, as it was trained)."""
        if self.clf is None:
            raise ValueError("this model has no classifier: build it with IGPTConfig(n_classes=...)")
        mask = self._bert_mask(tokens, mask)
        h = self.hidden(tokens, mask)
        return self.clf(h.mean(dim=1)).float(), self.generative_loss(self.wtet(h), tokens, mask)

    @torch.no_grad()
    def features(self, tokens, layers, mask=None):
        """Linear-probe features: the residual stream after each block in `layers` (1 = after the first block),
        normalised by the model's norm (no mean subtraction) without its gain and averaged over positions. Returns
        float32 [B, len(layers), n_embd], all from one forward pass that stops at the deepest layer asked for.
        mask as in forward: a BERT model's inputs are masked here too, as in training."""
        if not layers or min(layers) < 1 or max(layers) > self.config.n_layer:
            raise ValueError(f"layers must lie in 1..{self.config.n_layer}, got {list(layers)}")
        wanted, out = set(layers), {}
        h = self.embed(tokens, self._bert_mask(tokens, mask))
        for i, block in enumerate(self.h[: max(layers)], start=1):
            h = block(h)
            if i in wanted:
                out[i] = F.rms_norm(h.float(), (h.size(-1),), eps=self.ln_f.eps).mean(dim=1)
        return torch.stack([out[i] for i in layers], dim=1)

    # ---- generation: a static KV cache and a one-token step, in the style of gpt-fast ----

    def setup_kv_cache(self, batch_size, dtype=None):
        """Give every attention layer a KVCache for batch_size sequences of block_size tokens (None frees them)."""
        c = self.config
        for block in self.h:
            block.attn.kv_cache = None if batch_size is None else KVCache(
                batch_size, c.n_head, c.block_size, c.n_embd // c.n_head,
                dtype or self.wte.weight.dtype, self.wte.weight.device)

    def prefill(self, tokens):
        """Fill the cache with positions 0..P for the known tokens x_0..x_{P-1} ([B, P], P may be 0) and return
        the logits [B, n_vocab] for x_P."""
        B, P = tokens.shape
        h = self.embed(F.pad(tokens, (0, 1)))  # the padding token is never read: it would be the input at P+1
        return self._cached_logits(h, torch.arange(P + 1, device=h.device))[:, -1]

    def embed_next(self, token, input_pos):
        """The input at position p = input_pos (a [1] tensor): sos at p = 0, else wte[token] with token [B] the
        x_{p-1} of each sequence; plus wpe[p]. Returns [B, 1, n_embd]."""
        return torch.where(input_pos == 0, self.sos, self.wte(token))[:, None] + self.wpe(input_pos)

    def decode_step(self, token, input_pos):
        """One cached step: token [B] is x_{p-1} at position p = input_pos (at p = 0 the input is sos and token is
        not read); returns the logits [B, n_vocab] for x_p."""
        return self._cached_logits(self.embed_next(token, input_pos), input_pos)[:, -1]

    def _cached_logits(self, h, input_pos):
        for block in self.h:
            h = block(h, input_pos)
        return self.wtet(self.ln_f(h)).float()

    @classmethod
    def from_checkpoint(cls, path, map_location="cpu"):
        """Load a model saved by save_checkpoint (or train.py): from_saved of its contents."""
        return cls.from_saved(load_checkpoint(path, map_location), path)

    @classmethod
    def from_saved(cls, ckpt, name):
        """The model of a loaded checkpoint {"config", "model", and optionally "palette", "train_config"} (name:
        where it came from, for errors). The palette is set as `model.palette` (float32 [n_vocab, 3] in [-1, 1], or
        None) and the options it was trained with as `model.train_config` (a dict, empty when unknown)."""
        try:
            model = cls.from_state_dict(IGPTConfig(**ckpt["config"]), ckpt["model"])
        except ValueError as e:
            raise ValueError(f"{name}: {e}") from None
        model.palette = ckpt.get("palette")
        model.train_config = ckpt.get("train_config") or {}
        return model

    @classmethod
    def from_state_dict(cls, config, state):
        """A model of this config holding the tensors of `state` themselves (every one required): built on the meta
        device, so no random initialisation runs only to be overwritten."""
        with torch.device("meta"):
            model = cls(config)
        mismatch = weights_mismatch(model, state)
        if mismatch:
            raise ValueError(f"the weights do not fit the model of its config: {mismatch}")
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
        """Training FLOPs (forward + backward) per token: 6 per parameter but the embedding tables (a lookup
        multiplies nothing), plus 12 per layer, width and key attended for the attention's two products (q.k and
        the weighted sum of v). A BERT position attends to all T keys; a causal one to (T + 1) / 2 on average, flash
        attention skipping the masked half."""
        c = self.config
        keys = c.block_size if c.bert else (c.block_size + 1) / 2
        return 6 * self.get_num_params(non_embedding=True) + 12 * c.n_layer * c.n_embd * keys

    def estimate_mfu(self, images_per_second, peak_flops=989e12):
        """Model FLOPs utilisation against a peak rate (default: H100 SXM dense bf16)."""
        return self.flops_per_token() * self.config.block_size * images_per_second / peak_flops


def fixed_mask(image_ids, config, seed=0):
    """BERT masks [len(image_ids), block_size] (True = masked) that depend on (seed, image id) alone: row j comes
    from a generator seeded with (seed, image_ids[j]), so an image is masked alike whatever batch it is in, the batch
    size or the number of processes, and evaluations of a BERT model compare between runs. seed: an int or a tuple
    of ints."""
    seed = (seed,) if isinstance(seed, int) else tuple(seed)
    rows = [np.random.default_rng([*seed, int(i)]).random(config.block_size) for i in image_ids]
    return torch.from_numpy(np.stack(rows) < config.bert_mask_prob)


def weights_mismatch(model, state, optional=()):
    """Why the tensors of `state` cannot load into `model` (missing, unexpected or misshaped; names in `optional`
    may be missing), in one line, or "" when they fit."""
    want = {k: list(v.shape) for k, v in model.state_dict().items()}
    got = {k: list(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__ for k, v in state.items()}
    missing, unexpected = sorted(set(want) - set(got) - set(optional)), sorted(set(got) - set(want))
    problems = [f"{k} is {got[k]}, the model's is {want[k]}" for k in want if k in got and got[k] != want[k]]
    problems += [f"{what} {names[:4]}{' and more' if len(names) > 4 else ''}"
                 for what, names in (("missing", missing), ("unexpected", unexpected)) if names]
    return "; ".join(problems)


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
        probs = sorted_logits.softmax(dim=-1)
        drop_sorted = probs.cumsum(dim=-1) - probs >= top_p  # keep the smallest prefix reaching top_p
        logits = logits.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), -float("inf"))
    gumbel = -torch.log(-torch.log(uniform.clamp(1e-20, 1.0 - 1e-7)))
    return torch.argmax(logits + gumbel, dim=-1)


def check_generative(model, name="the model"):
    """Refuse a BERT model where images are generated, naming it `name` (e.g. its checkpoint's path)."""
    if model.config.bert:
        raise ValueError(f"{name} is a BERT model, which cannot generate: it predicts masked pixels from the rest of "
                         "an image and has no order to generate one in; give an autoregressive checkpoint")


def prime_tokens(model, num_samples=None, prime=None):
    """The known tokens [B, P] that generation continues, on the model's device: prime itself, or num_samples empty
    rows (P = 0) for unconditional samples."""
    device, T = model.wte.weight.device, model.config.block_size
    check_generative(model)
    if prime is None:
        if not num_samples:
            raise ValueError("give num_samples (at least 1) or prime")
        return torch.zeros(num_samples, 0, dtype=torch.long, device=device)
    if prime.ndim != 2 or prime.size(1) >= T:
        raise ValueError(f"prime has shape {list(prime.shape)}; it must be [B, P] with P shorter than the {T} "
                         "tokens of an image")
    return prime.to(device=device, dtype=torch.long)


@torch.no_grad()
def generate(model, num_samples=None, prime=None, temperature=1.0, top_k=None, top_p=None, generator=None,
             compile=False, progress=None):
    """Sample images as tokens [B, n_px*n_px] (int64) with a KV cache: prefill the known tokens, then one cached
    step a position. This is the plain path, the reference for engine.Engine's fused one.

    prime: optional [B, P] tokens to keep and continue (completions); else num_samples unconditional images.
    generator: the torch.Generator (on the model's device) that draws all the noise up front, so one seed gives the
    same images on one device. compile: run the one-token step through torch.compile. progress: called as
    progress(done, total, tokens) after each position, tokens [B, T] holding the first `done` of every row (an
    exception it raises stops the generation). The cache is freed on return."""
    prime = prime_tokens(model, num_samples, prime)
    (B, P), T = prime.shape, model.config.block_size
    noise = torch.rand(T - P, B, model.config.n_vocab, generator=generator, device=prime.device)
    tokens = torch.cat([prime, prime.new_zeros(B, T - P)], 1)
    step = model.decode_step
    if compile:  # on a GPU, reduce-overhead replays the compiled step as a CUDA graph: launches dominate one token
        step = torch.compile(step, dynamic=False, mode="reduce-overhead" if prime.is_cuda else None)
    model.setup_kv_cache(B)
    try:
        logits = model.prefill(prime)  # positions 0..P: the logits for x_P
        for i in range(P, T):
            if i > P:
                logits = step(tokens[:, i - 1], torch.tensor([i], device=prime.device))
            tokens[:, i] = sample_from_logits(logits, noise[i - P], temperature, top_k, top_p)
            if progress is not None:
                progress(i + 1, T, tokens)
    finally:
        model.setup_kv_cache(None)
    return tokens


# ---- the checkpoint format: a .pt holding {"config": dict, "model": state_dict, "palette": tensor | None, ...} ----
# written and read through common.save_verified and load_verified, which guard it with checksums: every tensor's,
# to name what changed, and the whole file's, to notice a change anywhere.

def save_checkpoint(path, model=None, palette=None, **extra):
    """Write a checkpoint atomically and with its checksums, so an interrupted write never leaves a broken file in
    place of a good one and a damaged one is refused on load. extra entries (optimizer state, step, ...) are stored
    beside. Nothing non-finite is saved: inf or nan is a ValueError."""
    obj = dict(extra)
    if model is not None:
        model = getattr(model, "_orig_mod", model)  # unwrap torch.compile
        obj["config"] = asdict(model.config)
        obj["model"] = model.state_dict()
    if palette is not None:
        obj["palette"] = torch.as_tensor(palette, dtype=torch.float32)
        if model is not None and len(palette) != model.config.n_vocab:  # a token would index no colour, or another
            raise ValueError(f"not writing {path}: the palette has {len(palette)} colours but the model has "
                             f"n_vocab={model.config.n_vocab}")
    bad = first_nonfinite(obj)
    if bad is not None:
        raise ValueError(f"not writing {path}: {bad} holds inf or nan")
    save_verified(path, obj)


def load_checkpoint(path, map_location="cpu"):
    """Read a checkpoint written by save_checkpoint, with weights_only=True (no code runs from the file), and
    verify it: a file changed since it was written (a flipped byte anywhere), or holding inf or nan, is a
    ValueError that names the file and the tensor or part."""
    path = os.fspath(path)
    if os.path.isfile(os.path.join(path, ".metadata")):
        raise ValueError(f"{path!r} is the folder of a sharded checkpoint (train.py --fsdp); make it one file with: "
                         f"python convert.py --from_dcp {path} --out model.pt")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint at {path!r}; for the original TF release run convert.py first")
    ckpt = load_verified(path, map_location)
    if not isinstance(ckpt, dict) or not all(isinstance(ckpt.get(k), dict) for k in ("config", "model")):
        raise ValueError(f"{path!r} is not an igpt checkpoint (train.py and convert.py write them): it is another "
                         "kind of file, cut short, or holds Python objects beyond tensors and plain values; an "
                         "original TF checkpoint needs convert.py")
    bad = first_nonfinite(ckpt)
    if bad is not None:
        raise ValueError(f"{path!r}: {bad} holds inf or nan (a diverged run's weights?); use an earlier checkpoint")
    unknown = set(ckpt["config"]) - {f.name for f in fields(IGPTConfig)}
    if unknown:
        raise ValueError(f"{path!r} has config fields this version does not know: {sorted(unknown)}")
    return ckpt

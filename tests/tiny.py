"""Small random models, token batches and palettes shared by the tests."""
import numpy as np
import torch

from igpt import IGPT, IGPTConfig

TINY = dict(n_px=4, n_vocab=16, n_embd=32, n_head=4, n_layer=2)


def randomised(model, seed=0):
    """Random weights everywhere, the zero-initialised head included, so every path carries signal."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3 + (1.0 if name.endswith(".g") else 0.0))
    return model


def tiny_model(seed=0, **overrides):
    return randomised(IGPT(IGPTConfig(**{**TINY, **overrides})), seed).eval()


def tokens(batch=3, seed=1, n_px=4, n_vocab=16):
    return torch.randint(0, n_vocab, (batch, n_px * n_px), generator=torch.Generator().manual_seed(seed))



def palette(n=16, seed=0):
    """A random palette of n colours in [-1, 1], float32 [n, 3]."""
    return (np.random.default_rng(seed).random((n, 3)) * 2 - 1).astype(np.float32)

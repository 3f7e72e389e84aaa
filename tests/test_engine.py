"""engine.py: the fused decode step and the Engine draw what the plain model computes and igpt.generate draws."""
import pytest
import torch

import engine
import igpt
from engine import Engine, FusedMLP, fuse_mlp
from tiny import tiny_model, tokens


def fast_engine(model, device):
    return Engine(model.to(device), fast=True, compile=False)


def seeded(device, seed):
    return torch.Generator(device).manual_seed(seed)


def test_the_fused_step_logits_equal_the_full_forward(kernel_device, monkeypatch):
    """The whole fused step (five kernels a block, the fused head) against the plain full forward, in float32,
    at every position; attention split several ways over each sequence."""
    monkeypatch.setattr(engine.kernels, "DECODE_BLOCK", 4)
    monkeypatch.setattr(engine.kernels, "DECODE_FIRST_BLOCK", 2)
    monkeypatch.setattr(engine.kernels, "DECODE_PROGRAMS", 24)
    model, x = tiny_model(n_embd=48).to(kernel_device), tokens().to(kernel_device)  # heads of 12, no power of 2
    caches = [igpt.KVCache(3, 4, 16, 12, torch.float32, kernel_device) for _ in model.h]
    got = [engine.fused_decode(model, caches, model.embed_next(x[:, max(i - 1, 0)], pos)[:, 0], pos)
           for i in range(16) for pos in [torch.tensor([i], device=kernel_device)]]
    tolerance = dict(rtol=1e-5, atol=1e-5) if kernel_device == "cpu" else dict(rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(torch.stack(got, 1), model(x)[0], **tolerance)


@pytest.mark.parametrize("prime_len", [0, 5])
def test_the_engine_draws_the_tokens_of_the_plain_generate(kernel_device, prime_len):
    model = tiny_model().to(kernel_device)
    prime = tokens(batch=4)[:, :prime_len].to(kernel_device)
    plain = igpt.generate(model, num_samples=4, prime=prime, generator=seeded(kernel_device, 0), top_k=8)
    fast = fast_engine(model, kernel_device).generate(num_samples=4, prime=prime, generator=seeded(kernel_device, 0),
                                                      top_k=8)
    assert torch.equal(fast, plain) and torch.equal(fast[:, :prime_len], prime)


def test_a_second_call_reuses_the_buffers_and_draws_what_a_fresh_engine_draws(kernel_device):
    """The second call, unconditional after a completion of the same batch size, finds the first call's buffers
    (and on a GPU its graph): nothing of the completion may leak into it."""
    fast = fast_engine(tiny_model(), kernel_device)
    fast.generate(prime=tokens(batch=2)[:, :6].to(kernel_device), generator=seeded(kernel_device, 5))
    kept = fast._buffers
    again = fast.generate(num_samples=2, generator=seeded(kernel_device, 7))
    assert fast._buffers is kept
    fresh = fast_engine(tiny_model(), kernel_device).generate(num_samples=2, generator=seeded(kernel_device, 7))
    assert torch.equal(again, fresh)


def test_weights_changed_in_place_or_replaced_are_what_the_next_call_samples_from(kernel_device):
    model = tiny_model().to(kernel_device)
    fast = fast_engine(model, kernel_device)
    fast.generate(num_samples=2, generator=seeded(kernel_device, 0))
    with torch.no_grad():
        model.wtet.weight.mul_(3.0)  # in place: the same addresses, so a kept graph reads the new values
    scaled = tiny_model().to(kernel_device)
    with torch.no_grad():
        scaled.wtet.weight.mul_(3.0)
    draw = lambda e: e.generate(num_samples=2, generator=seeded(kernel_device, 1))
    assert torch.equal(draw(fast), draw(fast_engine(scaled, kernel_device)))
    other = tiny_model(seed=4).to(kernel_device)
    model.load_state_dict(other.state_dict(), assign=True)  # new tensors: new buffers and graphs
    assert torch.equal(draw(fast), draw(fast_engine(other, kernel_device)))


def test_nothing_stays_with_the_model_and_dropping_the_engine_frees_its_buffers(kernel_device):
    import gc
    import weakref
    model = tiny_model().to(kernel_device)
    fast = fast_engine(model, kernel_device)
    fast.generate(prime=tokens(batch=2)[:, :6].to(kernel_device), generator=seeded(kernel_device, 0))
    assert all(block.attn.kv_cache is None for block in model.h)
    cache = weakref.ref(fast._buffers.caches[0].k)
    del fast
    gc.collect()
    assert cache() is None


def test_the_plain_door_is_igpt_generate_and_auto_is_plain_on_the_cpu():
    model = tiny_model()
    door = Engine(model)
    assert not door.fast
    got = door.generate(num_samples=3, generator=seeded("cpu", 2), temperature=0.8)
    assert torch.equal(got, igpt.generate(model, num_samples=3, generator=seeded("cpu", 2), temperature=0.8))


def test_asking_for_the_fused_step_where_it_cannot_run_says_why():
    with pytest.raises(ValueError, match="multiples of 16.*fast=False"):
        Engine(tiny_model(n_embd=40, n_head=4), fast=True)


def test_a_bert_model_is_refused_on_either_path(kernel_device):
    model = tiny_model(bert=True).to(kernel_device)
    for fast in (True, False):
        with pytest.raises(ValueError, match="is a BERT model, which cannot generate"):
            Engine(model, fast=fast, compile=False).generate(num_samples=2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("prime_len", [0, 5])
def test_cuda_graph_replays_draw_the_tokens_of_the_eager_steps(prime_len, monkeypatch):
    """The captured step is replayed for every position: its warm-up call must leave no trace, and each replay
    must read the position it advanced to."""
    model = tiny_model().cuda()
    prime = tokens(batch=4)[:, :prime_len].cuda()
    graphed = fast_engine(model, "cuda").generate(prime=prime, generator=seeded("cuda", 0))
    monkeypatch.setattr(engine, "_cuda_graph", lambda step, pos: step)
    eager = fast_engine(model, "cuda").generate(prime=prime, generator=seeded("cuda", 0))
    assert torch.equal(graphed, eager) and torch.equal(graphed[:, :prime_len], prime)


def test_fused_mlp_keeps_the_state_dict_and_off_the_gpu_is_the_plain_mlp():
    model = tiny_model()
    x = torch.randn(3, 5, 32)
    before, expected = model.state_dict(), model.h[0].mlp(x)
    fuse_mlp(model)
    assert isinstance(model.h[0].mlp, FusedMLP) and model.state_dict().keys() == before.keys()
    with torch.no_grad():
        torch.testing.assert_close(model.h[0].mlp(x), expected)  # float32 on the CPU: the plain MLP's path


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_fused_mlp_in_bf16_on_the_gpu_is_the_mlp_within_bf16_rounding():
    mlp = tiny_model().h[0].mlp.cuda().bfloat16()
    x = torch.randn(64, 32, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        fused, plain = FusedMLP(mlp)(x).double(), mlp(x).double()
    assert ((fused - plain).norm() / plain.norm()).item() < 1e-2  # bf16 rounding, in another order

"""igpt.generate, the plain KV-cached sampler: it must compute exactly what the full forward computes."""
import pytest
import torch

from igpt import generate, sample_from_logits
from tiny import tiny_model, tokens


def naive_generate(model, noise, prime, **kw):
    """The original's sampler: a full forward over the whole sequence for every new token, no cache."""
    B, P = prime.shape
    T = model.config.block_size
    x = torch.cat([prime, torch.zeros(B, T - P, dtype=torch.long)], 1)
    for i in range(P, T):
        logits = model(x)[0][:, i]
        x[:, i] = sample_from_logits(logits, noise[i - P], **kw)
    return x


def test_cached_step_logits_equal_the_full_forward_at_every_position():
    model, x = tiny_model(), tokens()
    full = model(x)[0]
    T = x.shape[1]
    model.setup_kv_cache(x.shape[0])
    got = [model.decode_step(x[:, 0], torch.tensor([0]))]  # sos at position 0: the token is not read
    for i in range(1, T):
        got.append(model.decode_step(x[:, i - 1], torch.tensor([i])))
    model.setup_kv_cache(None)
    torch.testing.assert_close(torch.stack(got, 1), full, rtol=1e-5, atol=1e-5)


def test_prefill_then_steps_equal_the_full_forward():
    model, x = tiny_model(), tokens()
    full = model(x)[0]
    model.setup_kv_cache(x.shape[0])
    first = model.prefill(x[:, :5])
    nxt = model.decode_step(x[:, 5], torch.tensor([6]))
    model.setup_kv_cache(None)
    torch.testing.assert_close(first, full[:, 5], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(nxt, full[:, 6], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kw", [dict(), dict(temperature=0.7, top_k=5), dict(top_p=0.8)])
def test_cached_generation_draws_exactly_the_naive_tokens(kw):
    model = tiny_model()
    g = torch.Generator().manual_seed(3)
    got = generate(model, num_samples=4, generator=g, **kw)
    noise = torch.rand(16, 4, 16, generator=torch.Generator().manual_seed(3))
    expected = naive_generate(model, noise, torch.zeros(4, 0, dtype=torch.long), **kw)
    assert torch.equal(got, expected)


def test_completions_keep_the_primed_tokens_and_match_naive():
    model, x = tiny_model(), tokens(batch=2)
    g = torch.Generator().manual_seed(5)
    got = generate(model, prime=x[:, :6], generator=g)
    assert torch.equal(got[:, :6], x[:, :6])
    noise = torch.rand(10, 2, 16, generator=torch.Generator().manual_seed(5))
    assert torch.equal(got, naive_generate(model, noise, x[:, :6]))


def test_same_seed_same_images_and_other_seed_other_images():
    model = tiny_model()
    a = generate(model, num_samples=3, generator=torch.Generator().manual_seed(0))
    b = generate(model, num_samples=3, generator=torch.Generator().manual_seed(0))
    c = generate(model, num_samples=3, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_top_k_one_is_greedy():
    logits = torch.randn(5, 16)
    u = torch.rand(5, 16)
    assert torch.equal(sample_from_logits(logits, u, top_k=1), logits.argmax(-1))


def test_top_p_keeps_the_smallest_prefix_reaching_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    draws = {sample_from_logits(logits, torch.rand(1, 4), top_p=0.75).item() for _ in range(200)}
    assert draws == {0, 1}


def test_gumbel_max_draws_follow_the_softmax():
    logits = torch.log(torch.tensor([0.6, 0.3, 0.1])).expand(20000, 3)
    g = torch.Generator().manual_seed(0)
    draws = sample_from_logits(logits, torch.rand(20000, 3, generator=g))
    freq = torch.bincount(draws, minlength=3).float() / 20000
    torch.testing.assert_close(freq, torch.tensor([0.6, 0.3, 0.1]), atol=0.015, rtol=0)


def test_a_temperature_draws_from_the_softmax_of_the_logits_divided_by_it():
    logits = torch.log(torch.tensor([0.6, 0.3, 0.1])).expand(20000, 3)
    g = torch.Generator().manual_seed(0)
    draws = sample_from_logits(logits, torch.rand(20000, 3, generator=g), temperature=0.5)
    freq = torch.bincount(draws, minlength=3).float() / 20000
    expected = torch.tensor([0.36, 0.09, 0.01]) / 0.46  # p^(1/T) normalised, T = 0.5
    torch.testing.assert_close(freq, expected, atol=0.015, rtol=0)


def test_prime_as_long_as_the_image_is_an_error():
    with pytest.raises(ValueError, match="shorter than"):
        generate(tiny_model(), prime=tokens(batch=1))


def test_nothing_stays_with_the_model_after_a_call():
    model = tiny_model()
    generate(model, num_samples=2, generator=torch.Generator().manual_seed(0))
    assert all(block.attn.kv_cache is None for block in model.h)


def test_progress_sees_every_position_filled_in_order():
    calls = []
    got = generate(tiny_model(), prime=tokens(batch=2)[:, :6],
                   progress=lambda done, total, x: calls.append((done, total, x[:, :done].clone())))
    assert [(done, total) for done, total, _ in calls] == [(i, 16) for i in range(7, 17)]
    assert all(torch.equal(x, got[:, :done]) for done, _, x in calls)


def test_an_exception_in_progress_stops_the_generation_and_frees_the_cache():
    model = tiny_model()

    def stop(done, total, x):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        generate(model, num_samples=2, progress=stop)
    assert all(block.attn.kv_cache is None for block in model.h)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_the_compiled_step_on_a_gpu_draws_the_tokens_of_the_eager_one():
    """compile=True on a GPU replays the step as a CUDA graph, which must still write the cache at every step."""
    model, prime = tiny_model().cuda(), tokens(batch=4)[:, :5].cuda()
    draw = lambda compile: generate(model, prime=prime, generator=torch.Generator("cuda").manual_seed(0),
                                    compile=compile)
    assert torch.equal(draw(True), draw(False))

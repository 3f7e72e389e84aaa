"""KV-cached generation: it must compute exactly what the full forward computes."""
import os
import subprocess
import sys

import pytest
import torch

import igpt
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


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("prime_len", [0, 5])
def test_cuda_graph_replays_draw_the_tokens_of_the_eager_steps(prime_len, monkeypatch):
    """The captured step is replayed for every position: its warm-up call must leave no trace, and each replay
    must read the position it advanced to."""
    model = tiny_model().cuda()
    prime = tokens(batch=4)[:, :prime_len].cuda()
    graphed = generate(model, prime=prime, generator=torch.Generator("cuda").manual_seed(0))
    model.setup_kv_cache(None)  # else the next call replays the kept graph
    monkeypatch.setattr(igpt, "_cuda_graph", lambda step, pos: step)
    eager = generate(model, prime=prime, generator=torch.Generator("cuda").manual_seed(0))
    assert torch.equal(graphed, eager) and torch.equal(graphed[:, :prime_len], prime)


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
def test_a_second_call_reuses_the_kept_sampler_and_draws_what_a_fresh_model_draws(device):
    """The second call, unconditional after a completion of the same batch size, finds the first call's buffers
    (and on a GPU its graph): nothing of the completion may leak into it."""
    model = tiny_model().to(device)
    generate(model, prime=tokens(batch=2)[:, :6].to(device), generator=torch.Generator(device).manual_seed(5))
    kept = igpt._samplers[model]
    again = generate(model, num_samples=2, generator=torch.Generator(device).manual_seed(7))
    assert igpt._samplers[model] is kept
    fresh = generate(tiny_model().to(device), num_samples=2, generator=torch.Generator(device).manual_seed(7))
    assert torch.equal(again, fresh)


@pytest.mark.parametrize("device", DEVICES)
def test_weights_changed_in_place_or_replaced_are_what_the_next_call_samples_from(device):
    model = tiny_model().to(device)
    generate(model, num_samples=2, generator=torch.Generator(device).manual_seed(0))
    with torch.no_grad():
        model.wtet.weight.mul_(3.0)  # in place: the same addresses, so the kept graph reads the new values
    scaled = tiny_model().to(device)
    with torch.no_grad():
        scaled.wtet.weight.mul_(3.0)
    draw = lambda m: generate(m, num_samples=2, generator=torch.Generator(device).manual_seed(1))
    assert torch.equal(draw(model), draw(scaled))
    other = tiny_model(seed=4).to(device)
    model.load_state_dict(other.state_dict(), assign=True)  # new tensors: a new sampler
    assert torch.equal(draw(model), draw(other))


def test_setup_kv_cache_none_frees_what_generate_keeps():
    model = tiny_model()
    generate(model, num_samples=2, generator=torch.Generator().manual_seed(0))
    assert model in igpt._samplers and model.h[0].attn.kv_cache is not None
    model.setup_kv_cache(None)
    assert model not in igpt._samplers and all(block.attn.kv_cache is None for block in model.h)


@pytest.mark.parametrize("batch, n_embd, halves", [(64, 512, True), (32, 256, True), (16, 512, False),
                                                    (63, 512, False), (128, 512, False), (64, 1024, False)])
def test_late_steps_of_batches_of_32_to_64_narrow_rows_run_in_halves(batch, n_embd, halves, monkeypatch):
    monkeypatch.setattr(igpt.IGPT, "can_fuse_decode", lambda self, h: True)
    model = igpt.IGPT(igpt.IGPTConfig(n_px=6, n_vocab=16, n_embd=n_embd, n_head=8, n_layer=1))
    assert igpt._halves_from(model, batch) == (24 if halves else 36)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_gpu_generation_in_halves_draws_the_tokens_of_one_chain(monkeypatch):
    """The step in halves (two streams, a CUDA graph of its own) from the middle of the image on."""
    model = tiny_model().cuda()
    one = generate(model, num_samples=4, generator=torch.Generator("cuda").manual_seed(0))
    model.setup_kv_cache(None)
    monkeypatch.setattr(igpt, "_halves_from", lambda model, batch_size: 7)
    halves = generate(model, num_samples=4, generator=torch.Generator("cuda").manual_seed(0))
    assert set(igpt._samplers[model].steps) == {False, True} and torch.equal(one, halves)


def test_prime_as_long_as_the_image_is_an_error():
    with pytest.raises(ValueError, match="shorter than"):
        generate(tiny_model(), prime=tokens(batch=1))


def run_in_triton_interpreter(script):
    """Run a script under Triton's CPU interpreter (TRITON_INTERPRET=1), in which the GPU kernels of the decode
    step run on CPU tensors; it prints "ok" when its checks pass."""
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, cwd=root)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]


def test_gpu_decode_attention_appends_to_the_cache_and_attends_over_the_prefix():
    """Every position count, splits that are partly filled, wholly empty, and a cache length that is not a
    multiple of the split; a first block shorter than the others; the new key and value land at pos and nowhere
    else."""
    run_in_triton_interpreter("""
import torch, igpt
torch.manual_seed(0)
igpt.DECODE_BLOCK, igpt.DECODE_FIRST_BLOCK = 16, 4
shapes = [(2, 3, 130, 16), (1, 2, 64, 32), (2, 2, 70, 24)]  # B, H, T, D; 24 is no power of 2, like iGPT-L's 96
cases = [(programs, shape, p) for programs in [1, 8, 1000]  # one split per sequence, a few, one block per split
         for shape in shapes for p in sorted({0, 1, 3, 4, 15, 16, 20, 21, 63, 64, shape[2] - 1}) if p < shape[2]]
for programs, (B, H, T, D), p in cases:
    igpt.DECODE_PROGRAMS = programs
    k_cache, v_cache = torch.randn(2, B, H, T, D)
    q, k, v = torch.randn(B, 3, H, D).unbind(1)  # strided views of one tensor, as the model passes them
    keys = torch.cat([k_cache[:, :, :p], k[:, :, None], k_cache[:, :, p + 1:]], 2)
    values = torch.cat([v_cache[:, :, :p], v[:, :, None], v_cache[:, :, p + 1:]], 2)
    got = igpt.decode_attention(q, k, v, k_cache, v_cache, torch.tensor([p]))
    ref = torch.softmax((q[:, :, None] @ keys[:, :, :p + 1].transpose(-1, -2)) / D ** 0.5, -1) @ values[:, :, :p + 1]
    assert torch.allclose(got, ref[:, :, 0], rtol=1e-5, atol=1e-5), (programs, B, H, T, D, p)
    assert torch.equal(k_cache, keys) and torch.equal(v_cache, values), (programs, B, H, T, D, p)
print("ok")
""")


def test_gpu_fused_linear_equals_norm_product_activation_and_residual():
    """The norm comes as norm_parts of its input, its sums of squares split over several partial columns."""
    run_in_triton_interpreter("""
import torch, torch.nn.functional as F, igpt
torch.manual_seed(0)
# batches up to 64, K and N not powers of 2; wide products (N > 512) take tiles of up to 64 rows, here part-filled;
# larger batches take plain ops
for M, K, N in [(1, 32, 48), (5, 64, 32), (64, 48, 16), (3, 32, 544), (40, 32, 576), (65, 32, 48)]:
    x, w, g, r = torch.randn(M, K), torch.randn(N, K), torch.rand(K) + 0.5, torch.randn(M, N)
    x_gained, x_sq = igpt.norm_parts(x, g)
    x_sq = torch.cat([x_sq * 0.25, x_sq * 0.75, torch.zeros(M, 1)], 1)  # three partial sums, not a power of 2
    for norm, gelu, residual in [(True, False, False), (False, False, True), (True, True, False), (True, True, True)]:
        h = F.linear(F.rms_norm(x, (K,), g, 1e-5) if norm else x, w)
        ref = (h * torch.sigmoid(1.702 * h) if gelu else h) + (r if residual else 0)
        got = igpt.fused_linear(x_gained if norm else x, w, x_sq if norm else None, r if residual else None, gelu, 1e-5)
        assert torch.allclose(got, ref, rtol=1e-5, atol=1e-5), (M, K, N, norm, gelu, residual)
print("ok")
""")


def test_gpu_residual_linear_writes_the_next_norms_parts():
    """out = residual + x W, and what the next norm reads of out: out * gain, and partial sums of squares of out's
    rows (one per tile of columns) that add up to the whole rows' sums."""
    run_in_triton_interpreter("""
import torch, torch.nn.functional as F, igpt
torch.manual_seed(0)
for M, K, N in [(1, 32, 48), (5, 64, 32), (64, 48, 64), (65, 32, 48)]:  # the last in plain ops
    x, w, r, g = torch.randn(M, K), torch.randn(N, K), torch.randn(M, N), torch.rand(N) + 0.5
    out, out_gained, out_sq = igpt.residual_linear(x, w, r, g)
    ref = F.linear(x, w) + r
    ref_gained, ref_sq = ref * g, ref.square().sum(1, keepdim=True)
    assert torch.allclose(out, ref, rtol=1e-5, atol=1e-5), (M, K, N)
    assert torch.allclose(out_gained, ref_gained, rtol=1e-5, atol=1e-5), (M, K, N)
    assert out_sq.shape == (M, N // igpt.linear_config(M, N, K)["BLOCK_N"] if M <= 64 else 1), out_sq.shape
    assert torch.allclose(out_sq.sum(1, keepdim=True), ref_sq, rtol=1e-5), (M, K, N)
print("ok")
""")


def test_gpu_linear_gelu_equals_product_then_activation():
    """The persistent TMA kernel over shapes that leave partial tiles on every edge, with more tiles than
    programs, so programs walk several tiles and groups of rows."""
    run_in_triton_interpreter("""
import torch, torch.nn.functional as F, igpt
torch.manual_seed(0)
igpt.LINEAR_GELU_CONFIG = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=16, GROUP_M=2, num_warps=4, num_stages=2)
for M, K, N in [(1, 16, 32), (70, 40, 100), (130, 24, 36)]:  # one tile; tiles cut on every edge
    x, w = torch.randn(M, K), torch.randn(N, K)
    h = F.linear(x, w)
    torch.testing.assert_close(igpt.linear_gelu(x, w), h * torch.sigmoid(1.702 * h), rtol=1e-5, atol=1e-5)
print("ok")
""")


def test_gpu_fused_decode_step_logits_equal_the_full_forward():
    """The whole fused step (five kernels a block, the fused head) against the plain full forward, fp32."""
    run_in_triton_interpreter("""
import sys, torch, igpt
sys.path.insert(0, "tests")
from tiny import tiny_model, tokens
igpt.DECODE_BLOCK, igpt.DECODE_FIRST_BLOCK, igpt.DECODE_PROGRAMS = 4, 2, 24  # several splits per sequence
model, x = tiny_model(n_embd=48), tokens()  # heads of 12, no power of 2
assert model.can_fuse_decode(x)
full = model(x)[0]
model.setup_kv_cache(x.shape[0])
got = [model.decode_step(x[:, max(i - 1, 0)], torch.tensor([i])) for i in range(x.shape[1])]  # sos at 0
torch.testing.assert_close(torch.stack(got, 1), full, rtol=1e-5, atol=1e-5)
print("ok")
""")


def test_gpu_fused_decode_in_halves_equals_one_chain():
    """Each half's chain writes its own rows of the caches and computes its rows' logits."""
    run_in_triton_interpreter("""
import sys, torch, igpt
sys.path.insert(0, "tests")
from tiny import tiny_model, tokens
model, x = tiny_model(), tokens(batch=4)
logits, caches = {}, {}
for halves in (False, True):
    model.setup_kv_cache(x.shape[0])
    logits[halves] = torch.stack([model.decode_step(x[:, max(i - 1, 0)], torch.tensor([i]), halves)
                                  for i in range(x.shape[1])], 1)
    caches[halves] = torch.stack([torch.stack([b.attn.kv_cache.k, b.attn.kv_cache.v]) for b in model.h])
torch.testing.assert_close(logits[True], logits[False], rtol=1e-5, atol=1e-5)
torch.testing.assert_close(caches[True], caches[False], rtol=1e-5, atol=1e-5)
torch.testing.assert_close(logits[True], model(x)[0], rtol=1e-5, atol=1e-5)
print("ok")
""")

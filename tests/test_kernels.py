"""The Triton kernels against the products and attention written out, on the GPU or in Triton's interpreter."""
import pytest
import torch
import torch.nn.functional as F

import kernels


def close(device):
    """Tolerances: float32 throughout in the interpreter; on the GPU the same, but summed in another order."""
    return dict(rtol=1e-5, atol=1e-5) if device == "cpu" else dict(rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("programs", [1, 8, 1000])  # one split per sequence, a few, one block per split
@pytest.mark.parametrize("B, H, T, D", [(2, 3, 130, 16), (1, 2, 64, 32), (2, 2, 70, 24)])  # 24: no power of 2
def test_decode_attention_appends_to_the_cache_and_attends_over_the_prefix(kernel_device, monkeypatch, programs,
                                                                           B, H, T, D):
    """Every position count, splits that are partly filled or wholly empty, a cache length that is not a multiple
    of the split, a first block shorter than the others; the new key and value land at pos and nowhere else."""
    monkeypatch.setattr(kernels, "DECODE_BLOCK", 16)
    monkeypatch.setattr(kernels, "DECODE_FIRST_BLOCK", 4)
    monkeypatch.setattr(kernels, "DECODE_PROGRAMS", programs)
    torch.manual_seed(0)
    for p in sorted({0, 1, 3, 4, 15, 16, 20, 21, 63, 64, T - 1}):
        if p >= T:
            continue
        k_cache, v_cache = torch.randn(2, B, H, T, D, device=kernel_device)
        q, k, v = torch.randn(B, 3, H, D, device=kernel_device).unbind(1)  # strided views, as the model passes
        keys = torch.cat([k_cache[:, :, :p], k[:, :, None], k_cache[:, :, p + 1:]], 2)
        values = torch.cat([v_cache[:, :, :p], v[:, :, None], v_cache[:, :, p + 1:]], 2)
        got = kernels.decode_attention(q, k, v, k_cache, v_cache, torch.tensor([p], device=kernel_device))
        scores = (q[:, :, None] @ keys[:, :, :p + 1].transpose(-1, -2)) / D ** 0.5
        ref = torch.softmax(scores, -1) @ values[:, :, :p + 1]
        torch.testing.assert_close(got, ref[:, :, 0], **close(kernel_device), msg=f"position {p}")
        assert torch.equal(k_cache, keys) and torch.equal(v_cache, values), p


# batches up to 64, K and N not powers of 2; wide products (N > 512) take tiles of up to 64 rows, here part-filled;
# larger batches take plain ops
@pytest.mark.parametrize("M, K, N", [(1, 32, 48), (5, 64, 32), (64, 48, 16), (3, 32, 544), (40, 32, 576),
                                     (65, 32, 48)])
def test_fused_linear_equals_norm_product_activation_and_residual(kernel_device, M, K, N):
    """The norm comes as norm_parts of its input, its sums of squares split over several partial columns."""
    torch.manual_seed(0)
    x, w, r = torch.randn(M, K, device=kernel_device), torch.randn(N, K, device=kernel_device), \
        torch.randn(M, N, device=kernel_device)
    g = torch.rand(K, device=kernel_device) + 0.5
    x_gained, x_sq = kernels.norm_parts(x, g)
    x_sq = torch.cat([x_sq * 0.25, x_sq * 0.75, torch.zeros_like(x_sq)], 1)  # three partial sums, no power of 2
    for norm, gelu, residual in [(True, False, False), (False, False, True), (True, True, False), (True, True, True)]:
        h = F.linear(F.rms_norm(x, (K,), g, 1e-5) if norm else x, w)
        ref = (h * torch.sigmoid(1.702 * h) if gelu else h) + (r if residual else 0)
        got = kernels.fused_linear(x_gained if norm else x, w, x_sq if norm else None, r if residual else None, gelu,
                                   1e-5)
        torch.testing.assert_close(got, ref, **close(kernel_device), msg=f"norm {norm}, gelu {gelu}, res {residual}")


@pytest.mark.parametrize("M, K, N", [(1, 32, 48), (5, 64, 32), (64, 48, 64), (65, 32, 48)])  # the last: plain ops
def test_residual_linear_writes_the_next_norms_parts(kernel_device, M, K, N):
    """out = residual + x W, and what the next norm reads of out: out * gain, and partial sums of squares of out's
    rows (one per tile of columns) that add up to the whole rows' sums."""
    torch.manual_seed(0)
    x, w, r = (torch.randn(*shape, device=kernel_device) for shape in ((M, K), (N, K), (M, N)))
    g = torch.rand(N, device=kernel_device) + 0.5
    out, out_gained, out_sq = kernels.residual_linear(x, w, r, g)
    ref = F.linear(x, w) + r
    torch.testing.assert_close(out, ref, **close(kernel_device))
    torch.testing.assert_close(out_gained, ref * g, **close(kernel_device))
    parts = N // kernels.linear_config(M, N, K)["BLOCK_N"] if M <= 64 else 1
    assert out_sq.shape == (M, parts)
    torch.testing.assert_close(out_sq.sum(1, keepdim=True), ref.square().sum(1, keepdim=True), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("M, K, N", [(1, 16, 32), (70, 40, 96), (130, 24, 40)])  # one tile; cut on every edge
def test_linear_gelu_equals_product_then_activation(kernel_device, monkeypatch, M, K, N):
    """The persistent TMA kernel over shapes that leave partial tiles on every edge, with more tiles than
    programs, so programs walk several tiles and groups of rows. On the GPU it runs in bf16, its dtype there."""
    monkeypatch.setattr(kernels, "LINEAR_GELU_CONFIG",
                        dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=16, GROUP_M=2, num_warps=4, num_stages=2))
    torch.manual_seed(0)
    dtype = torch.float32 if kernel_device == "cpu" else torch.bfloat16
    x, w = torch.randn(M, K, device=kernel_device, dtype=dtype), torch.randn(N, K, device=kernel_device, dtype=dtype)
    h = F.linear(x.float(), w.float())
    tolerance = close(kernel_device) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(kernels.linear_gelu(x, w).float(), h * torch.sigmoid(1.702 * h), **tolerance)

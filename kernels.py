"""
The GPU kernels of the fast paths (engine.py uses them): a decode step in five Triton kernels a block, and the MLP's
first product with its activation in the epilogue, for 16-bit inference over whole sequences.

Why five kernels a block. With one new token per sequence every matrix product is thin (B rows against a weight of
up to 2048 x 512), so a kernel costs its launch and latency, not its arithmetic, and the plain block's eleven kernels
a step (two norms, four products, the activation, two cache writes, attention and its combine) cost nearly as much
as reading the KV cache, which is the real work. So each norm fuses into the product that follows it,
(x g) W * rsqrt(mean(x^2) + eps), the row scale applied after the product; the activation and the residual add go
into the product's epilogue; and the cache write goes into attention:

    qkv = norm_1(x) W_attn,  y = attend(q, cache + (k, v)),  x += y W_proj,  h = gelu(norm_2(x) W_fc),  x += h W_out

Why each product also writes the next norm's inputs. A norm needs whole rows and a product's program sees a tile, so
each kernel that updates x also writes what the next norm reads: x g, and its tile's sums of squares of x's rows.
Then the next product's loop only loads and multiplies, which keeps its loads pipelined (an elementwise pass over x
inside the loop stalls them).

Why dependent launch. On Hopper the kernels launch with programmatic dependent launch (PDL): each is scheduled while
the one before it finishes and waits at its start for that kernel's results, so the gaps between a step's kernels
overlap work. What does not depend on the kernel before is asked for before the wait: the products' weights,
attention's first block of the cache and, in L2, the positions after it.

Why linear_gelu. Over whole sequences the products are large and cuBLAS's are the fastest, except the MLP's first:
its activation, a separate pass over the widest tensor, costs nearly as much as the product itself, so linear_gelu
applies it before the product's tile leaves the chip.

Every kernel is a torch custom op, so torch.compile calls it as one opaque launch, and each runs in Triton's CPU
interpreter (TRITON_INTERPRET=1) too, which is how the tests check them without a GPU. The launch choices were
measured on an H100 (docs/2026-11-25-sampling.md); they are gathered in the table below.
"""
import os
from typing import Optional

import torch
import torch.nn.functional as F

from igpt import activation

try:  # Triton >= 3.4 (PyTorch >= 2.8); without it (CPU-only installs, older versions) the plain model runs
    import triton
    import triton.language as tl
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:
    triton = None

# ---- the launch choices, each the fastest measured for iGPT-S (docs/2026-11-25-sampling.md) ----
DECODE_BLOCK = 128       # cache positions per loop iteration of an attention program
DECODE_FIRST_BLOCK = 16  # positions of its first block, read before the wait for its inputs, when all programs run
                         # at once (at most DECODE_PROGRAMS): at early positions it is all there is to read
DECODE_AHEAD = 32        # positions after the first block asked for in L2 before the wait (Hopper)
DECODE_TILE = 8192       # at most this many elements of k (and of v) per iteration, so wider heads keep registers
DECODE_PROGRAMS = 512    # split a layer's attention over the positions until it has about this many programs
DECODE_WARPS = 2         # twice as many for heads padded to a power of 2, as iGPT-L's 96
LINEAR_GELU_CONFIG = dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=4, num_warps=8, num_stages=3)
# the thin products' tiles depend on the shape: linear_config below


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
            # columns of them in L2 (LINE elements a line), where every tile's loop below finds them
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
        # block would spend its arithmetic on masked lanes.
        pos = tl.load(pos_ptr)
        start = split * split_len
        end = tl.minimum(start + split_len, pos)  # a split wholly after pos reads nothing
        first = start + tl.arange(0, FIRST_BLOCK)
        first_valid = first < end
        first_ptrs = (bh * max_len + first[:, None]) * HEAD_DIM + d[None, :]
        k_first = tl.load(k_ptr + first_ptrs, mask=first_valid[:, None] & in_head[None, :], other=0.0)
        v_first = tl.load(v_ptr + first_ptrs, mask=first_valid[:, None] & in_head[None, :], other=0.0)
        if PDL:
            # the loop's first positions are asked for in L2 as well (LINE elements a 128-byte line), so the HBM
            # works while the product before finishes
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
        # the loop counts from the split's start, from a constant: one from start + FIRST_BLOCK compiles to a
        # slower loop
        for offset in range(FIRST_BLOCK, end - start, BLOCK):
            n = start + offset + tl.arange(0, BLOCK)
            valid = n < end
            ptrs = (bh * max_len + n[:, None]) * HEAD_DIM + d[None, :]
            k = tl.load(k_ptr + ptrs, mask=valid[:, None] & in_head[None, :], other=0.0)
            m, p, rescale = _softmax_scores(q, k, valid, m)
            # v is loaded after the scores, so k's and v's tiles are never in registers together (both at once
            # spill and cost bandwidth)
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


def runs_on(device) -> bool:
    """Whether the kernels can run on tensors of this device: a GPU with Triton, or any device in the interpreter."""
    return triton is not None and (torch.device(device).type == "cuda" or _interpreted())


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
    The fastest of the tile sizes, warps and stages tried for each product of iGPT-S at M = 64."""
    if N <= 512:
        return dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=_pow2_block(K, 256), num_warps=2, num_stages=3)
    return dict(BLOCK_M=min(64, max(16, triton.next_power_of_2(M))), BLOCK_N=_pow2_block(N, 32),
                BLOCK_K=_pow2_block(K, 128), num_warps=4, num_stages=4)


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
    # waves of programs it only costs
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



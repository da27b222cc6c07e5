"""
kernels.py — the hot path of both towers, in one place: packed variable-length attention and the
fused ops around it, each as a readable PyTorch reference and a Triton kernel, behind one dispatch.

Both the vision tower (window attention over 64-patch windows, full attention per frame) and
the language model (causal attention over packed documents, GQA) call exactly one attention
function, `varlen_attention`, on *packed* tensors:

    q: (total_q, n_heads,    head_dim)      cu_seqlens_q: (n_segments + 1,) int32, starts at 0
    k: (total_k, n_kv_heads, head_dim)      cu_seqlens_k: (n_segments + 1,) int32
    v: (total_k, n_kv_heads, head_dim)

Segment i holds rows cu_seqlens_q[i]:cu_seqlens_q[i+1] of q and cu_seqlens_k[i]:cu_seqlens_k[i+1]
of k/v; tokens never attend across segments. n_heads must be a multiple of n_kv_heads (GQA:
query head h reads KV head h // (n_heads // n_kv_heads)). With `causal=True` and segments whose
query is shorter than their key (decoding with a KV cache) the mask is aligned bottom-right, as
in flash-attention: the last query row sees every key. max_seqlen_q/k must be at least the
longest segment (as in flash-attention: the Triton path sizes its grid with them).

Public ops (each `<op>` has its reference `<op>_torch` beside its Triton version):

    varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                     causal=False, scale=None)                            -> (total_q, n_heads, head_dim)
    rms_norm(x, weight, eps)                    Qwen2 RMSNorm over the last dim
    apply_rotary(x, cos, sin)                   x: (tokens, heads, head_dim), cos/sin: (tokens, head_dim)
                                                -> x*cos + rotate_half(x)*sin  (LM M-RoPE, ViT 2D RoPE)
    swiglu(gate, up)                            silu(gate) * up
    linear_cross_entropy(hidden, weight, labels, ignore_index=-100, reduction="mean", chunk_size=None)
                                                CE of hidden @ weight.T without materialising
                                                [tokens, vocab] logits on the Triton path

Dispatch (one rule for every op, `_use_triton`): the Triton kernel when the tensors are on CUDA
and `triton` imports, the PyTorch reference otherwise. `MIMOVL_KERNELS=torch|triton` forces a
path; a one-time loud warning is printed when tensors are on CUDA but Triton is unusable.
On a CPU the Triton path runs only through the Triton interpreter, which must be switched on
before `triton` is first imported:  TRITON_INTERPRET=1 MIMOVL_KERNELS=triton python ...
(that is how tests/test_kernels.py checks every kernel without a GPU).

Precision: every kernel accumulates in fp32 (attention: fp16/bf16 matmul inputs with fp32
accumulation, softmax statistics in fp32; fused ops: all arithmetic in fp32, one rounding to
the output dtype). fp32 attention inputs use IEEE fp32 dots (no TF32).

The attention kernels follow FlashAttention-2 (Dao, 2023, arXiv:2307.08691): online softmax over
key blocks, the log-sum-exp saved for the backward pass, which recomputes the probabilities.
Layering as in Liger-Kernel: Triton kernel -> autograd Function -> public function.
Benchmarks: `python bench.py --gpu` (see bench.py).
"""

import math
import os
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torch.utils.checkpoint

try:
    import triton
    import triton.language as tl
    TRITON_IMPORT_ERROR = None
except Exception as err:  # no Triton wheel (macOS, Windows) or a broken install: PyTorch path everywhere
    triton = None
    TRITON_IMPORT_ERROR = err

    class tl:  # stand-in so that the kernel signatures below (`BLOCK: tl.constexpr`) still parse
        constexpr = None


def _jit(fn):
    return triton.jit(fn) if triton is not None else fn


# Triton decides interpreter-or-GPU when a kernel is decorated, i.e. when this module is imported.
INTERPRET = os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "on", "yes")


# The interpreter converts fp32 -> bf16 by truncation, a GPU rounds to nearest even: in the
# interpreter, kernels round in software first (otherwise every bf16 result would carry up to
# twice the GPU's rounding error and no bf16 test could hold a kernel to the GPU's accuracy).
_SOFT_BF16_ROUNDING = tl.constexpr(INTERPRET) if triton is not None else INTERPRET


@_jit
def _cast(x, dtype: tl.constexpr):
    """x.to(dtype), rounding to nearest even also in the interpreter."""
    if _SOFT_BF16_ROUNDING:
        if dtype == tl.bfloat16:
            bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
            x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)


def cpu_has_native_bf16():
    """True when the CPU has bf16 matrix instructions (x86 avx512_bf16 / AMX). Without them bf16
    matmuls are emulated and slower than fp32 (measured in this project on an AMD Zen 5 with
    avx512_bf16: bf16 matmul ~850 GFLOP/s against ~210 for fp32 on 2 cores)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = set(f.read().split())
    except OSError:
        return False
    return bool(flags & {"avx512_bf16", "amx_bf16"})

# -----------------------------------------------------------------------------
# Dispatch

_warned_no_triton = False


def _use_triton(x):
    """The one dispatch rule (module docstring). `x` is the op's main input tensor."""
    global _warned_no_triton
    forced = os.environ.get("MIMOVL_KERNELS", "").strip().lower()
    if forced not in ("", "torch", "triton"):
        raise ValueError(f"MIMOVL_KERNELS={forced!r}: expected 'torch' or 'triton' (or unset)")
    if forced == "torch":
        return False
    if forced == "triton":
        if triton is None:
            raise RuntimeError(f"MIMOVL_KERNELS=triton but `import triton` failed ({TRITON_IMPORT_ERROR}); "
                               "install triton (Linux) or unset MIMOVL_KERNELS")
        if not x.is_cuda and not INTERPRET:
            raise RuntimeError("MIMOVL_KERNELS=triton with CPU tensors needs the Triton interpreter: set "
                               "TRITON_INTERPRET=1 in the environment before Python starts")
        return True
    if not x.is_cuda:
        return False
    if triton is None or INTERPRET:
        if not _warned_no_triton:
            _warned_no_triton = True
            why = (f"`import triton` failed ({TRITON_IMPORT_ERROR})" if triton is None
                   else "TRITON_INTERPRET=1 is set (the interpreter would run GPU tensors on the CPU)")
            warnings.warn(f"\n{'!' * 78}\nmimovl kernels: CUDA tensors but the Triton path is unusable: {why}.\n"
                          f"Falling back to the (slower, memory-hungry) PyTorch reference ops.\n{'!' * 78}",
                          RuntimeWarning, stacklevel=3)
        return False
    return True


def _cdiv(a, b):
    return (a + b - 1) // b


def next_pow2(n):
    return 1 << max(0, n - 1).bit_length()


def row_block(n_cols, device):
    """Tiling of row kernels: (columns padded to a power of two, rows per tile, warps).
    A tile holds ~4K elements on a GPU (one row of the 4096-wide LM), more in the interpreter,
    whose cost is per program and per op rather than per element."""
    block = next_pow2(n_cols)
    if block > 65536:
        raise ValueError(f"last dimension {n_cols} is too large for the row kernels (max 65536)")
    rows = max(1, min(64, (4096 if device.type == "cuda" else 16384) // block))
    return block, rows, min(16, max(1, block * rows // 512))


# =============================================================================
# 1. Varlen attention
# =============================================================================

# -----------------------------------------------------------------------------
# 1a. PyTorch reference

def varlen_attention_torch(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                           causal, scale):
    """Per-segment SDPA on 4-D tensors. On CPU this is the fast path: SDPA takes its fused
    kernel only for 4-D inputs, and one call with a block-diagonal mask over the whole pack was
    measured up to 100x slower than a loop over segments (on this project's 2-core CPU).
    Consecutive segments of equal (query, key) lengths - the ViT's 64-patch windows, the rows of
    a decoding step - are one batched call: equal packed segments are just a reshape."""
    n_heads, n_kv_heads, hd = q.shape[1], k.shape[1], q.shape[2]
    group = n_heads // n_kv_heads
    out = torch.empty_like(q)
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    i, n = 0, len(cq) - 1
    while i < n:
        lq, lk = cq[i + 1] - cq[i], ck[i + 1] - ck[i]
        j = i + 1                                    # run of segments i..j-1 with equal lengths
        while j < n and cq[j + 1] - cq[j] == lq and ck[j + 1] - ck[j] == lk:
            j += 1
        g, q0, k0 = j - i, cq[i], ck[i]
        i = j
        if lq == 0:
            continue
        qs = q[q0:q0 + g * lq].view(g, lq, n_heads, hd).transpose(1, 2)      # (g, nh, Lq, hd)
        ks = k[k0:k0 + g * lk].view(g, lk, n_kv_heads, hd).transpose(1, 2)   # (g, nkv, Lk, hd)
        vs = v[k0:k0 + g * lk].view(g, lk, n_kv_heads, hd).transpose(1, 2)
        if group > 1:
            ks = ks.repeat_interleave(group, dim=1)  # (g, nh, Lk, hd)
            vs = vs.repeat_interleave(group, dim=1)
        mask, is_causal = None, False
        if causal and lq == lk:
            is_causal = True
        elif causal:
            # bottom-right aligned: query row r sees keys [0, lk - lq + r]
            rows = torch.arange(lq, device=q.device)[:, None] + (lk - lq)
            mask = torch.arange(lk, device=q.device)[None, :] <= rows  # (Lq, Lk) bool
        o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, is_causal=is_causal,
                                           scale=scale)  # (g, nh, Lq, hd)
        out[q0:q0 + g * lq] = o.transpose(1, 2).reshape(g * lq, n_heads, hd)
    return out


# -----------------------------------------------------------------------------
# 1b. Tile schedule: one program per real (segment, row block) tile
#
# A pack of one 5000-token frame and a hundred 64-token windows must not launch
# n_segments x cdiv(max_seqlen, BLOCK) programs (mostly empty). The grid is instead the list of
# real tiles, built on the device without a host sync: the number of programs is the bound
# sum_i ceil(len_i / B) <= min(n_seg * ceil(max_len / B), (total + n_seg * (B - 1)) // B), and
# the (at most n_seg) programs past the last real tile exit at once. Tiles are ordered heaviest
# first (longest loop) so that the long causal tiles do not start last and run alone.
#
# Building it takes ~20 tiny torch ops, as long as a whole 64-token-window attention kernel. A
# model passes one cu_seqlens tensor to all its layers, so the schedule is cached on that tensor
# (it lives and dies with it; an in-place change bumps its _version and rebuilds it).

def _tile_schedule(cu_seqlens, cu_seqlens_other, max_seqlen, total, block, pass_, causal):
    """Returns (seg, blk) int32 tensors, one entry per program: program p covers rows
    [blk*block, (blk+1)*block) of segment seg (seg = -1: nothing to do). The rows are queries
    (pass_ 'q': forward and dQ) or keys (pass_ 'k': dK/dV); cu_seqlens_other is the other side."""
    # (the other side only orders the tiles: a stale id there could cost speed, never correctness)
    key = (pass_, block, bool(causal), max_seqlen, total, cu_seqlens._version,
           id(cu_seqlens_other), cu_seqlens_other._version)
    cache = cu_seqlens.__dict__.setdefault("_mimovl_tile_schedules", {})
    if key not in cache:
        if len(cache) >= 8:  # forward + dK/dV + dQ schedules of a layer are 3 entries
            cache.pop(next(iter(cache)))
        cache[key] = _build_tile_schedule(cu_seqlens, cu_seqlens_other, max_seqlen, total, block, pass_, causal)
    return cache[key]


def _build_tile_schedule(cu_seqlens, cu_seqlens_other, max_seqlen, total, block, pass_, causal):
    n_seg = cu_seqlens.numel() - 1
    lens = (cu_seqlens[1:] - cu_seqlens[:-1]).long()  # (n_seg,)
    lens_other = (cu_seqlens_other[1:] - cu_seqlens_other[:-1]).long()
    cu_tiles = F.pad(torch.cumsum(_cdiv(lens, block), 0), (1, 0))  # (n_seg + 1,)
    n_prog = max(1, min(n_seg * _cdiv(max_seqlen, block), (total + n_seg * (block - 1)) // block))
    t = torch.arange(n_prog, device=cu_seqlens.device)
    seg = torch.searchsorted(cu_tiles, t, right=True) - 1  # n_seg for t past the last real tile
    real = seg < n_seg
    seg = seg.clamp(max=n_seg - 1)
    blk = t - cu_tiles[seg]
    length, length_other = lens[seg], lens_other[seg]
    if not causal:
        work = length_other  # every tile visits all rows of the other side
    elif pass_ == "q":  # keys visited by query block blk (bottom-right aligned causal mask)
        work = torch.clamp(torch.minimum(length_other, (blk + 1) * block + length_other - length), min=0)
    else:  # queries visited by key block blk
        work = length_other - torch.clamp(blk * block - (length - length_other), min=0)
    order = torch.argsort(torch.where(real, work, -1), descending=True, stable=True)
    seg = torch.where(real, seg, -1)
    return seg[order].int().contiguous(), blk[order].int().contiguous()


# -----------------------------------------------------------------------------
# 1c. Block sizes
#
# Head dims must be powers of two for tl.arange/tl.dot, so a head dim is split into at most two
# power-of-two pieces: 64 -> 64, 128 -> 128, 80 -> 64 + 16 (the ViT: no padding to 128, which
# would waste 37.5% of the matmul work), 96 -> 64 + 32. Dims that do not split exactly mask the
# tail of the last piece (72 -> 64 + 16 with 8 masked columns).

def split_head_dim(d):
    if d <= 16:
        return 16, 0
    d0 = 1 << (d.bit_length() - 1)
    rest = d - d0
    return d0, (0 if rest == 0 else max(16, next_pow2(rest)))


@dataclass(frozen=True)
class AttnBlocks:
    """Tile sizes of one attention kernel. block_m: query rows per tile, block_n: key rows."""
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


def attn_blocks(pass_, head_dim, max_seqlen_q, max_seqlen_k, device, dtype=torch.bfloat16):
    """Block sizes per pass ('fwd', 'dkdv', 'dq'). Chosen so that no kernel spills registers
    when compiled for sm_90 (Hopper; checked with Triton's compiler on a CPU machine:
    `cuobjdump --dump-resource-usage`); `python bench.py --gpu --sweep` times alternatives."""
    if device.type != "cuda":
        # Interpreter: small tiles make tiny test shapes cover several tiles and masked edges.
        return AttnBlocks(32, 32, 1, 1)
    if dtype == torch.float32:  # fp32 tiles are twice the size: smaller ones (no tensor cores anyway)
        return AttnBlocks(64, 32, 4, 2) if pass_ == "fwd" else AttnBlocks(32, 32, 4, 1)
    d0, d1 = split_head_dim(head_dim)
    wide = d0 + d1 > 64  # 80 (64 + 16) and 128
    if pass_ == "fwd":
        if max_seqlen_q <= 64:  # ViT windows: one 64-row tile per window
            return AttnBlocks(64, 64, 4, 3)
        return AttnBlocks(128, 64, 8, 3)
    if pass_ == "dkdv":
        if max_seqlen_k <= 64:
            return AttnBlocks(64, 64, 4, 2)
        if d0 + d1 >= 128:
            return AttnBlocks(64, 64, 8, 2)
        return AttnBlocks(64, 128, 8, 2) if wide else AttnBlocks(32, 128, 8, 2)
    if pass_ == "dq":
        if max_seqlen_q <= 64:
            return AttnBlocks(64, 64, 4, 2)
        return AttnBlocks(64, 64, 8, 2) if d0 + d1 >= 128 else AttnBlocks(128, 64, 8, 2)
    raise ValueError(f"unknown attention pass {pass_!r}")


# -----------------------------------------------------------------------------
# 1d. Triton kernels
#
# Layout inside every kernel: a (rows, head_dim) tile of q/k/v/o is loaded as piece 0 (columns
# [0, D0)) and, when D1 > 0, piece 1 (columns [D0, D0 + D1)); every dot over the head dim is the
# sum of the two pieces' dots and every (rows, head_dim) accumulator is kept as two pieces.
# Softmax runs in base 2: s2 = (q . k) * scale * log2(e), LSE2 = log2(sum 2^s2), p = 2^(s2 - LSE2).
# UPCAST (interpreter + bf16 only: bf16 arithmetic is wrong in the Triton interpreter) turns
# every load into fp32.

@_jit
def _load_tile(ptrs, row_ok, cols, HEAD_DIM: tl.constexpr, COL_MASK: tl.constexpr,
               UPCAST: tl.constexpr):
    """(rows, piece) tile; rows outside the segment read as 0."""
    if COL_MASK:
        x = tl.load(ptrs, mask=row_ok[:, None] & (cols[None, :] < HEAD_DIM), other=0.0)
    else:
        x = tl.load(ptrs, mask=row_ok[:, None], other=0.0)
    if UPCAST:
        x = x.to(tl.float32)
    return x


@_jit
def _store_tile(ptrs, x, row_ok, cols, HEAD_DIM: tl.constexpr, COL_MASK: tl.constexpr):
    if COL_MASK:
        tl.store(ptrs, _cast(x, ptrs.dtype.element_ty), mask=row_ok[:, None] & (cols[None, :] < HEAD_DIM))
    else:
        tl.store(ptrs, _cast(x, ptrs.dtype.element_ty), mask=row_ok[:, None])


@_jit
def _tile_bounds(tile_blk, cu_q, cu_k, seg):
    """This program's block index within segment `seg`, and the segment's query and key rows
    (start, length) in the packed tensors."""
    blk = tl.load(tile_blk + tl.program_id(1))
    q_start = tl.load(cu_q + seg)
    k_start = tl.load(cu_k + seg)
    return blk, q_start, tl.load(cu_q + seg + 1) - q_start, k_start, tl.load(cu_k + seg + 1) - k_start


@_jit
def _query_tile_key_range(blk, k_len, shift, BLOCK_M: tl.constexpr, CAUSAL: tl.constexpr):
    """Keys [0, hi) are visited by query block blk; key blocks entirely below `mask_from` need no
    mask (every key is in range and visible to every row of the tile), the few above it do."""
    if CAUSAL:
        return tl.minimum(k_len, (blk + 1) * BLOCK_M + shift), tl.minimum(k_len, blk * BLOCK_M + shift + 1)
    return k_len, k_len


@_jit
def attn_fwd_kernel(
    Q, K, V, O, LSE2, cu_q, cu_k, tile_seg, tile_blk,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
    total_q, qk_scale2,
    GROUP: tl.constexpr, CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr,
    D0: tl.constexpr, D1: tl.constexpr, MASK0: tl.constexpr, MASK1: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """One program: BLOCK_M query rows of one segment, one query head; loops over key blocks."""
    head = tl.program_id(0)
    seg = tl.load(tile_seg + tl.program_id(1))
    if seg < 0:  # past the last real tile
        return
    blk, q_start, q_len, k_start, k_len = _tile_bounds(tile_blk, cu_q, cu_k, seg)
    shift = k_len - q_len  # bottom-right causal alignment: row r sees keys <= r + shift
    kv_head = head // GROUP

    offs_m = blk * BLOCK_M + tl.arange(0, BLOCK_M)  # query rows within the segment
    offs_n = tl.arange(0, BLOCK_N)
    cols0 = tl.arange(0, D0)
    row_ok = offs_m < q_len
    # Pointers: a 64-bit base at the segment's first row, int32 offsets within the segment.
    q_ptr = Q + q_start.to(tl.int64) * stride_qt + head * stride_qh + offs_m[:, None] * stride_qt
    q0 = _load_tile(q_ptr + cols0[None, :], row_ok, cols0, HEAD_DIM, MASK0, UPCAST)  # (BM, D0)
    acc0 = tl.zeros([BLOCK_M, D0], dtype=tl.float32)
    if D1 > 0:
        cols1 = D0 + tl.arange(0, D1)
        q1 = _load_tile(q_ptr + cols1[None, :], row_ok, cols1, HEAD_DIM, MASK1, UPCAST)  # (BM, D1)
        acc1 = tl.zeros([BLOCK_M, D1], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)  # running row max (base 2)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)  # running sum of 2^(s2 - m_i)

    hi, mask_from = _query_tile_key_range(blk, k_len, shift, BLOCK_M, CAUSAL)
    k_base = K + k_start.to(tl.int64) * stride_kt + kv_head * stride_kh
    v_base = V + k_start.to(tl.int64) * stride_vt + kv_head * stride_vh
    for start_n in range(0, hi, BLOCK_N):
        key_ok = start_n + offs_n < k_len
        k_ptr = k_base + (start_n + offs_n)[:, None] * stride_kt
        v_ptr = v_base + (start_n + offs_n)[:, None] * stride_vt
        k0 = _load_tile(k_ptr + cols0[None, :], key_ok, cols0, HEAD_DIM, MASK0, UPCAST)
        s = tl.dot(q0, tl.trans(k0), input_precision=DOT_PREC)  # (BM, BN)
        if D1 > 0:
            k1 = _load_tile(k_ptr + cols1[None, :], key_ok, cols1, HEAD_DIM, MASK1, UPCAST)
            s = tl.dot(q1, tl.trans(k1), s, input_precision=DOT_PREC)
        s = s * qk_scale2
        if start_n + BLOCK_N > mask_from:
            visible = key_ok[None, :]
            if CAUSAL:
                visible = visible & ((start_n + offs_n)[None, :] <= offs_m[:, None] + shift)
            s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with no visible key yet
        p = tl.math.exp2(s - m_use[:, None])  # (BM, BN)
        alpha = tl.math.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        m_i = m_new
        v0 = _load_tile(v_ptr + cols0[None, :], key_ok, cols0, HEAD_DIM, MASK0, UPCAST)
        p = p.to(v0.dtype)
        acc0 = tl.dot(p, v0, acc0 * alpha[:, None], input_precision=DOT_PREC)
        if D1 > 0:
            v1 = _load_tile(v_ptr + cols1[None, :], key_ok, cols1, HEAD_DIM, MASK1, UPCAST)
            acc1 = tl.dot(p, v1, acc1 * alpha[:, None], input_precision=DOT_PREC)

    # Rows that saw no key at all (causal, query longer than key) output 0 and store LSE = +inf,
    # which makes their probabilities exactly 0 in the backward pass.
    empty = l_i == 0.0
    inv_l = tl.where(empty, 0.0, 1.0 / tl.where(empty, 1.0, l_i))
    o_ptr = O + q_start.to(tl.int64) * stride_ot + head * stride_oh + offs_m[:, None] * stride_ot
    _store_tile(o_ptr + cols0[None, :], acc0 * inv_l[:, None], row_ok, cols0, HEAD_DIM, MASK0)
    if D1 > 0:
        _store_tile(o_ptr + cols1[None, :], acc1 * inv_l[:, None], row_ok, cols1, HEAD_DIM, MASK1)
    lse2 = tl.where(empty, float("inf"), m_i + tl.math.log2(tl.where(empty, 1.0, l_i)))
    tl.store(LSE2 + head * total_q + q_start + offs_m, lse2, mask=row_ok)


@_jit
def attn_bwd_delta_kernel(O, DO, DELTA, stride_ot, stride_oh, stride_dot, stride_doh, total_q,
                           HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_T: tl.constexpr):
    """delta[h, t] = sum_d O[t, h, d] * dO[t, h, d]  (= rowsum(P * dP), FlashAttention-2 eq. for dS)."""
    head = tl.program_id(0)
    rows = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, D_PAD)
    ok = (rows < total_q)[:, None] & (cols < HEAD_DIM)[None, :]
    rows64 = rows.to(tl.int64)
    o = tl.load(O + rows64[:, None] * stride_ot + head * stride_oh + cols[None, :], mask=ok, other=0.0)
    do = tl.load(DO + rows64[:, None] * stride_dot + head * stride_doh + cols[None, :], mask=ok, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + head * total_q + rows, delta, mask=rows < total_q)


@_jit
def attn_bwd_dkdv_kernel(
    Q, K, V, DO, LSE2, DELTA, DK, DV, cu_q, cu_k, tile_seg, tile_blk,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
    stride_dkt, stride_dkh, stride_dvt, stride_dvh,
    total_q, qk_scale2, scale,
    GROUP: tl.constexpr, CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr,
    D0: tl.constexpr, D1: tl.constexpr, MASK0: tl.constexpr, MASK1: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """One program: BLOCK_N keys of one segment and one KV head. It loops over the GROUP query
    heads that share this KV head (GQA without repeating K/V) and over their query blocks, and
    accumulates dK, dV in registers (transposed scores: sT = k q^T is (BLOCK_N, BLOCK_M))."""
    kv_head = tl.program_id(0)
    seg = tl.load(tile_seg + tl.program_id(1))
    if seg < 0:  # past the last real tile
        return
    blk, q_start, q_len, k_start, k_len = _tile_bounds(tile_blk, cu_q, cu_k, seg)
    shift = k_len - q_len

    start_n = blk * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)  # keys within the segment
    offs_m = tl.arange(0, BLOCK_M)
    cols0 = tl.arange(0, D0)
    key_ok = offs_n < k_len
    k_ptr = K + k_start.to(tl.int64) * stride_kt + kv_head * stride_kh + offs_n[:, None] * stride_kt
    v_ptr = V + k_start.to(tl.int64) * stride_vt + kv_head * stride_vh + offs_n[:, None] * stride_vt
    # Keys past the segment end read as 0: their dK/dV rows are computed but never stored.
    k0 = _load_tile(k_ptr + cols0[None, :], key_ok, cols0, HEAD_DIM, MASK0, UPCAST)  # (BN, D0)
    v0 = _load_tile(v_ptr + cols0[None, :], key_ok, cols0, HEAD_DIM, MASK0, UPCAST)
    dk0 = tl.zeros([BLOCK_N, D0], dtype=tl.float32)
    dv0 = tl.zeros([BLOCK_N, D0], dtype=tl.float32)
    if D1 > 0:
        cols1 = D0 + tl.arange(0, D1)
        k1 = _load_tile(k_ptr + cols1[None, :], key_ok, cols1, HEAD_DIM, MASK1, UPCAST)
        v1 = _load_tile(v_ptr + cols1[None, :], key_ok, cols1, HEAD_DIM, MASK1, UPCAST)
        dk1 = tl.zeros([BLOCK_N, D1], dtype=tl.float32)
        dv1 = tl.zeros([BLOCK_N, D1], dtype=tl.float32)

    # Query rows r see key n iff n <= r + shift: rows below start_n - shift never see this block,
    # rows from start_n + BLOCK_N - 1 - shift on see all of it (no mask needed there).
    if CAUSAL:
        lo = tl.maximum(start_n - shift, 0) // BLOCK_M * BLOCK_M
        mask_below = start_n + BLOCK_N - 1 - shift
    else:
        lo = 0
        mask_below = 0
    for g in range(GROUP):
        head = kv_head * GROUP + g
        q_base = Q + q_start.to(tl.int64) * stride_qt + head * stride_qh
        do_base = DO + q_start.to(tl.int64) * stride_dot + head * stride_doh
        for start_m in range(lo, q_len, BLOCK_M):
            rows = start_m + offs_m
            row_ok = rows < q_len
            q_ptr = q_base + rows[:, None] * stride_qt
            do_ptr = do_base + rows[:, None] * stride_dot
            # Rows past the segment end: q = dO = 0 and LSE = +inf, so p = 0 and they add nothing.
            q0 = _load_tile(q_ptr + cols0[None, :], row_ok, cols0, HEAD_DIM, MASK0, UPCAST)
            do0 = _load_tile(do_ptr + cols0[None, :], row_ok, cols0, HEAD_DIM, MASK0, UPCAST)
            lse2 = tl.load(LSE2 + head * total_q + q_start + rows, mask=row_ok, other=float("inf"))
            delta = tl.load(DELTA + head * total_q + q_start + rows, mask=row_ok, other=0.0)
            sT = tl.dot(k0, tl.trans(q0), input_precision=DOT_PREC)  # (BN, BM)
            if D1 > 0:
                q1 = _load_tile(q_ptr + cols1[None, :], row_ok, cols1, HEAD_DIM, MASK1, UPCAST)
                do1 = _load_tile(do_ptr + cols1[None, :], row_ok, cols1, HEAD_DIM, MASK1, UPCAST)
                sT = tl.dot(k1, tl.trans(q1), sT, input_precision=DOT_PREC)
            pT = tl.math.exp2(sT * qk_scale2 - lse2[None, :])  # (BN, BM) probabilities
            if CAUSAL:
                if start_m < mask_below:
                    pT = tl.where(offs_n[:, None] <= rows[None, :] + shift, pT, 0.0)
            dv0 = tl.dot(pT.to(do0.dtype), do0, dv0, input_precision=DOT_PREC)
            dpT = tl.dot(v0, tl.trans(do0), input_precision=DOT_PREC)  # (BN, BM) = (dO v^T)^T
            if D1 > 0:
                dv1 = tl.dot(pT.to(do1.dtype), do1, dv1, input_precision=DOT_PREC)
                dpT = tl.dot(v1, tl.trans(do1), dpT, input_precision=DOT_PREC)
            dsT = pT * (dpT - delta[None, :])  # gradient w.r.t. the scaled scores
            dk0 = tl.dot(dsT.to(q0.dtype), q0, dk0, input_precision=DOT_PREC)
            if D1 > 0:
                dk1 = tl.dot(dsT.to(q1.dtype), q1, dk1, input_precision=DOT_PREC)

    dk_ptr = DK + k_start.to(tl.int64) * stride_dkt + kv_head * stride_dkh + offs_n[:, None] * stride_dkt
    dv_ptr = DV + k_start.to(tl.int64) * stride_dvt + kv_head * stride_dvh + offs_n[:, None] * stride_dvt
    _store_tile(dk_ptr + cols0[None, :], dk0 * scale, key_ok, cols0, HEAD_DIM, MASK0)
    _store_tile(dv_ptr + cols0[None, :], dv0, key_ok, cols0, HEAD_DIM, MASK0)
    if D1 > 0:
        _store_tile(dk_ptr + cols1[None, :], dk1 * scale, key_ok, cols1, HEAD_DIM, MASK1)
        _store_tile(dv_ptr + cols1[None, :], dv1, key_ok, cols1, HEAD_DIM, MASK1)


@_jit
def attn_bwd_dq_kernel(
    Q, K, V, DO, LSE2, DELTA, DQ, cu_q, cu_k, tile_seg, tile_blk,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
    stride_dqt, stride_dqh,
    total_q, qk_scale2, scale,
    GROUP: tl.constexpr, CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr,
    D0: tl.constexpr, D1: tl.constexpr, MASK0: tl.constexpr, MASK1: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """One program: BLOCK_M query rows of one segment and one query head; loops over key blocks
    like the forward pass and accumulates dQ in registers (no atomics: deterministic)."""
    head = tl.program_id(0)
    seg = tl.load(tile_seg + tl.program_id(1))
    if seg < 0:  # past the last real tile
        return
    blk, q_start, q_len, k_start, k_len = _tile_bounds(tile_blk, cu_q, cu_k, seg)
    shift = k_len - q_len
    kv_head = head // GROUP

    offs_m = blk * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    cols0 = tl.arange(0, D0)
    row_ok = offs_m < q_len
    q_ptr = Q + q_start.to(tl.int64) * stride_qt + head * stride_qh + offs_m[:, None] * stride_qt
    do_ptr = DO + q_start.to(tl.int64) * stride_dot + head * stride_doh + offs_m[:, None] * stride_dot
    q0 = _load_tile(q_ptr + cols0[None, :], row_ok, cols0, HEAD_DIM, MASK0, UPCAST)
    do0 = _load_tile(do_ptr + cols0[None, :], row_ok, cols0, HEAD_DIM, MASK0, UPCAST)
    dq0 = tl.zeros([BLOCK_M, D0], dtype=tl.float32)
    if D1 > 0:
        cols1 = D0 + tl.arange(0, D1)
        q1 = _load_tile(q_ptr + cols1[None, :], row_ok, cols1, HEAD_DIM, MASK1, UPCAST)
        do1 = _load_tile(do_ptr + cols1[None, :], row_ok, cols1, HEAD_DIM, MASK1, UPCAST)
        dq1 = tl.zeros([BLOCK_M, D1], dtype=tl.float32)
    lse2 = tl.load(LSE2 + head * total_q + q_start + offs_m, mask=row_ok, other=float("inf"))
    delta = tl.load(DELTA + head * total_q + q_start + offs_m, mask=row_ok, other=0.0)

    # (non-causal: keys past the segment end read as 0 and add dS * 0 = 0, so no mask at all)
    hi, mask_from = _query_tile_key_range(blk, k_len, shift, BLOCK_M, CAUSAL)
    k_base = K + k_start.to(tl.int64) * stride_kt + kv_head * stride_kh
    v_base = V + k_start.to(tl.int64) * stride_vt + kv_head * stride_vh
    for start_n in range(0, hi, BLOCK_N):
        key_ok = start_n + offs_n < k_len
        k_ptr = k_base + (start_n + offs_n)[:, None] * stride_kt
        v_ptr = v_base + (start_n + offs_n)[:, None] * stride_vt
        k0 = _load_tile(k_ptr + cols0[None, :], key_ok, cols0, HEAD_DIM, MASK0, UPCAST)
        v0 = _load_tile(v_ptr + cols0[None, :], key_ok, cols0, HEAD_DIM, MASK0, UPCAST)
        s = tl.dot(q0, tl.trans(k0), input_precision=DOT_PREC)  # (BM, BN)
        dp = tl.dot(do0, tl.trans(v0), input_precision=DOT_PREC)
        if D1 > 0:
            k1 = _load_tile(k_ptr + cols1[None, :], key_ok, cols1, HEAD_DIM, MASK1, UPCAST)
            v1 = _load_tile(v_ptr + cols1[None, :], key_ok, cols1, HEAD_DIM, MASK1, UPCAST)
            s = tl.dot(q1, tl.trans(k1), s, input_precision=DOT_PREC)
            dp = tl.dot(do1, tl.trans(v1), dp, input_precision=DOT_PREC)
        p = tl.math.exp2(s * qk_scale2 - lse2[:, None])
        if CAUSAL:
            if start_n + BLOCK_N > mask_from:
                p = tl.where((start_n + offs_n)[None, :] <= offs_m[:, None] + shift, p, 0.0)
        ds = p * (dp - delta[:, None])  # (BM, BN)
        dq0 = tl.dot(ds.to(k0.dtype), k0, dq0, input_precision=DOT_PREC)
        if D1 > 0:
            dq1 = tl.dot(ds.to(k1.dtype), k1, dq1, input_precision=DOT_PREC)

    dq_ptr = DQ + q_start.to(tl.int64) * stride_dqt + head * stride_dqh + offs_m[:, None] * stride_dqt
    _store_tile(dq_ptr + cols0[None, :], dq0 * scale, row_ok, cols0, HEAD_DIM, MASK0)
    if D1 > 0:
        _store_tile(dq_ptr + cols1[None, :], dq1 * scale, row_ok, cols1, HEAD_DIM, MASK1)


# -----------------------------------------------------------------------------
# 1e. Launchers and the autograd Function

def _attn_consts(q, head_dim, causal, group):
    d0, d1 = split_head_dim(head_dim)
    return dict(GROUP=group, CAUSAL=bool(causal), HEAD_DIM=head_dim, D0=d0, D1=d1,
                MASK0=d0 > head_dim, MASK1=d0 + d1 > head_dim,
                UPCAST=INTERPRET and q.dtype == torch.bfloat16,
                DOT_PREC="ieee" if q.dtype == torch.float32 else "tf32")


def _attn_forward(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale, blocks=None):
    total_q, n_heads, head_dim = q.shape
    o = torch.empty((total_q, n_heads, head_dim), dtype=q.dtype, device=q.device)
    lse2 = torch.empty((n_heads, total_q), dtype=torch.float32, device=q.device)  # log2 units
    if total_q == 0:
        return o, lse2
    b = blocks or attn_blocks("fwd", head_dim, max_q, max_k, q.device, q.dtype)
    seg, blk = _tile_schedule(cu_q, cu_k, max_q, total_q, b.block_m, "q", causal)
    attn_fwd_kernel[(n_heads, seg.numel())](
        q, k, v, o, lse2, cu_q, cu_k, seg, blk,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        o.stride(0), o.stride(1), total_q, scale * math.log2(math.e),
        **_attn_consts(q, head_dim, causal, n_heads // k.shape[1]),
        BLOCK_M=b.block_m, BLOCK_N=b.block_n, num_warps=b.num_warps, num_stages=b.num_stages)
    return o, lse2


def _attn_backward(do, q, k, v, o, lse2, cu_q, cu_k, max_q, max_k, causal, scale, blocks=None):
    total_q, n_heads, head_dim = q.shape
    total_k, n_kv_heads = k.shape[:2]
    dq = torch.empty((total_q, n_heads, head_dim), dtype=q.dtype, device=q.device)
    dk = torch.empty((total_k, n_kv_heads, head_dim), dtype=k.dtype, device=k.device)
    dv = torch.empty((total_k, n_kv_heads, head_dim), dtype=v.dtype, device=v.device)
    if total_q == 0:
        return dq, dk.zero_(), dv.zero_()
    if do.stride(-1) != 1:
        do = do.contiguous()
    consts = _attn_consts(q, head_dim, causal, n_heads // n_kv_heads)

    delta = torch.empty((n_heads, total_q), dtype=torch.float32, device=q.device)
    block_t = 16 if q.device.type != "cuda" else 64
    attn_bwd_delta_kernel[(n_heads, _cdiv(total_q, block_t))](
        o, do, delta, o.stride(0), o.stride(1), do.stride(0), do.stride(1), total_q,
        HEAD_DIM=head_dim, D_PAD=next_pow2(max(16, head_dim)), BLOCK_T=block_t)

    b = (blocks or {}).get("dkdv") or attn_blocks("dkdv", head_dim, max_q, max_k, q.device, q.dtype)
    if total_k > 0:  # every key row is in a tile, also those of segments without queries
        seg, blk = _tile_schedule(cu_k, cu_q, max_k, total_k, b.block_n, "k", causal)
        attn_bwd_dkdv_kernel[(n_kv_heads, seg.numel())](
            q, k, v, do, lse2, delta, dk, dv, cu_q, cu_k, seg, blk,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            do.stride(0), do.stride(1), dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1),
            total_q, scale * math.log2(math.e), scale, **consts,
            BLOCK_M=b.block_m, BLOCK_N=b.block_n, num_warps=b.num_warps, num_stages=b.num_stages)

    b = (blocks or {}).get("dq") or attn_blocks("dq", head_dim, max_q, max_k, q.device, q.dtype)
    seg, blk = _tile_schedule(cu_q, cu_k, max_q, total_q, b.block_m, "q", causal)
    attn_bwd_dq_kernel[(n_heads, seg.numel())](
        q, k, v, do, lse2, delta, dq, cu_q, cu_k, seg, blk,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        do.stride(0), do.stride(1), dq.stride(0), dq.stride(1),
        total_q, scale * math.log2(math.e), scale, **consts,
        BLOCK_M=b.block_m, BLOCK_N=b.block_n, num_warps=b.num_warps, num_stages=b.num_stages)
    return dq, dk, dv


class _VarlenAttentionFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, cu_q, cu_k, max_q, max_k, causal, scale, blocks):
        o, lse2 = _attn_forward(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale,
                                (blocks or {}).get("fwd"))
        ctx.save_for_backward(q, k, v, o, lse2, cu_q, cu_k)
        ctx.args = (max_q, max_k, causal, scale, blocks)
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse2, cu_q, cu_k = ctx.saved_tensors
        dq, dk, dv = _attn_backward(do, q, k, v, o, lse2, cu_q, cu_k, *ctx.args)
        return dq, dk, dv, None, None, None, None, None, None, None


def varlen_attention_triton(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                            causal, scale, blocks=None):
    """Triton varlen flash attention (differentiable). `blocks` overrides the tile sizes:
    {'fwd': AttnBlocks, 'dkdv': AttnBlocks, 'dq': AttnBlocks} (tests and bench.py sweeps)."""
    def last_dim_contiguous(t):
        return t if t.stride(-1) == 1 else t.contiguous()
    q, k, v = last_dim_contiguous(q), last_dim_contiguous(k), last_dim_contiguous(v)
    cu_q = cu_seqlens_q.to(device=q.device, dtype=torch.int32)
    cu_k = cu_seqlens_k.to(device=q.device, dtype=torch.int32)
    return _VarlenAttentionFn.apply(q, k, v, cu_q, cu_k, int(max_seqlen_q), int(max_seqlen_k),
                                    bool(causal), float(scale), blocks)


def _check_attention_inputs(q, k, v, cu_seqlens_q, cu_seqlens_k):
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise ValueError(f"varlen_attention: q, k, v must be (tokens, heads, head_dim); got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if k.shape != v.shape or q.shape[2] != k.shape[2] or q.shape[1] % k.shape[1] != 0:
        raise ValueError(f"varlen_attention: need k.shape == v.shape, equal head dims and n_heads a "
                         f"multiple of n_kv_heads; got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"varlen_attention: q, k, v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype})")
    if cu_seqlens_q.dim() != 1 or cu_seqlens_q.shape != cu_seqlens_k.shape or cu_seqlens_q.numel() < 2:
        raise ValueError(f"varlen_attention: cu_seqlens_q/k must be 1-D of equal length n_segments + 1 >= 2; "
                         f"got {tuple(cu_seqlens_q.shape)} and {tuple(cu_seqlens_k.shape)}")


def varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                     causal=False, scale=None):
    """Packed variable-length attention (see the module docstring for shapes)."""
    _check_attention_inputs(q, k, v, cu_seqlens_q, cu_seqlens_k)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    if _use_triton(q):
        return varlen_attention_triton(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                       max_seqlen_k, causal, scale)
    return varlen_attention_torch(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                  max_seqlen_k, causal, scale)


# =============================================================================
# 2. RMSNorm
# =============================================================================

def rms_norm_torch(x, weight, eps):
    """RMSNorm as Qwen2 computes it: statistics in fp32, scale applied in the input dtype."""
    dtype = x.dtype
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(dtype)


@_jit
def rms_norm_fwd_kernel(X, W, Y, RSTD, stride_x, stride_y, n_rows, n_cols, eps,
                         ROWS: tl.constexpr, BLOCK: tl.constexpr):
    """ROWS rows per program: y = w * round_to_x_dtype(x * rstd), rstd = 1/sqrt(mean(x^2) + eps)."""
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK)
    row_ok = rows < n_rows
    ok = row_ok[:, None] & (cols < n_cols)[None, :]
    rows64 = rows.to(tl.int64)[:, None]
    x = tl.load(X + rows64 * stride_x + cols[None, :], mask=ok, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, 1) / n_cols + eps)  # (ROWS,)
    x_hat = _cast(x * rstd[:, None], X.dtype.element_ty).to(tl.float32)  # the reference rounds here
    w = tl.load(W + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
    tl.store(Y + rows64 * stride_y + cols[None, :], _cast(w[None, :] * x_hat, Y.dtype.element_ty), mask=ok)
    tl.store(RSTD + rows, rstd, mask=row_ok)


@_jit
def rms_norm_bwd_kernel(X, W, DY, DX, RSTD, DW_PART, stride_x, stride_dy, stride_dx,
                         n_rows, n_cols, rows_per_program, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    """A run of rows per program, ROWS at a time; per-program dW partial sums are reduced by
    the caller.  dx = rstd * (g - x_hat * mean(g * x_hat)) with g = dy * w;  dw = sum dy * x_hat."""
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    col_ok = cols < n_cols
    w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK], dtype=tl.float32)
    row_end = tl.minimum((pid + 1) * rows_per_program, n_rows)
    for row0 in range(pid * rows_per_program, row_end, ROWS):
        rows = row0 + tl.arange(0, ROWS)
        row_ok = rows < row_end
        ok = row_ok[:, None] & col_ok[None, :]
        rows64 = rows.to(tl.int64)[:, None]
        x = tl.load(X + rows64 * stride_x + cols[None, :], mask=ok, other=0.0).to(tl.float32)
        dy = tl.load(DY + rows64 * stride_dy + cols[None, :], mask=ok, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + rows, mask=row_ok, other=0.0)
        x_hat = x * rstd[:, None]
        dw += tl.sum(dy * x_hat, 0)
        g = dy * w[None, :]
        dx = rstd[:, None] * (g - x_hat * (tl.sum(g * x_hat, 1) / n_cols)[:, None])
        tl.store(DX + rows64 * stride_dx + cols[None, :], _cast(dx, DX.dtype.element_ty), mask=ok)
    tl.store(DW_PART + pid * n_cols + cols, dw, mask=col_ok)


class _RMSNormFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if x2.stride(-1) != 1:
            x2 = x2.contiguous()
        n_rows, n_cols = x2.shape
        y = torch.empty((n_rows, n_cols), dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
        rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device)
        block, rows, warps = row_block(n_cols, x.device)
        if n_rows > 0:
            rms_norm_fwd_kernel[(_cdiv(n_rows, rows),)](x2, weight, y, rstd, x2.stride(0), y.stride(0),
                                                         n_rows, n_cols, float(eps), ROWS=rows,
                                                         BLOCK=block, num_warps=warps)
        ctx.save_for_backward(x2, weight, rstd)
        return y.reshape(shape)

    @staticmethod
    def backward(ctx, dy):
        x2, weight, rstd = ctx.saved_tensors
        n_rows, n_cols = x2.shape
        dy2 = dy.reshape(n_rows, n_cols)
        if dy2.stride(-1) != 1:
            dy2 = dy2.contiguous()
        dx = torch.empty_like(x2)
        block, rows, warps = row_block(n_cols, x2.device)
        n_prog = max(1, min(_cdiv(n_rows, rows), 4 * _sm_count(x2.device)))
        rows_per_program = _cdiv(_cdiv(n_rows, n_prog), rows) * rows
        n_prog = max(1, _cdiv(n_rows, rows_per_program))
        dw_part = torch.empty((n_prog, n_cols), dtype=torch.float32, device=x2.device)
        if n_rows > 0:
            rms_norm_bwd_kernel[(n_prog,)](x2, weight, dy2, dx, rstd, dw_part, x2.stride(0),
                                            dy2.stride(0), dx.stride(0), n_rows, n_cols,
                                            rows_per_program, ROWS=rows, BLOCK=block, num_warps=warps)
        else:
            dw_part.zero_()
        return dx.reshape(dy.shape), dw_part.sum(0).to(weight.dtype), None


def _sm_count(device):
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1  # interpreter: programs run one after another, fewer is faster


def rms_norm(x, weight, eps):
    """Qwen2 RMSNorm over the last dim of x; weight: (x.shape[-1],)."""
    if weight.shape != (x.shape[-1],):
        raise ValueError(f"rms_norm: weight shape {tuple(weight.shape)} does not match the last dim of x "
                         f"{tuple(x.shape)}")
    if _use_triton(x):
        return _RMSNormFn.apply(x, weight, eps)
    return rms_norm_torch(x, weight, eps)


# =============================================================================
# 3. Rotary position embedding (rotate-half convention)
# =============================================================================
#
# Both the LM's M-RoPE and the ViT's 2D RoPE (transformers `apply_multimodal_rotary_pos_emb`,
# `rot_pos_emb`) end as per-token cos/sin tables of shape (tokens, head_dim); only how the angles
# are built differs (that lives in mimovl.py / vit.py). Writing x = [x1, x2] (two halves of the head dim):
#     out = x * cos + rotate_half(x) * sin,   rotate_half(x) = [-x2, x1]
# i.e. out1 = x1*cos1 - x2*sin1, out2 = x2*cos2 + x1*sin2. The backward is the transpose:
#     dx1 = g1*cos1 + g2*sin2,   dx2 = g2*cos2 - g1*sin1.
# cos/sin are treated as constants (no gradient). Arithmetic in fp32, result in x's dtype.

def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_torch(x, cos, sin):
    """x: (tokens, heads, head_dim); cos, sin: (tokens, head_dim)."""
    x32 = x.float()
    cos, sin = cos.float()[:, None, :], sin.float()[:, None, :]  # (tokens, 1, head_dim)
    return (x32 * cos + rotate_half(x32) * sin).to(x.dtype)


@_jit
def rotary_kernel(X, COS, SIN, Y, stride_xt, stride_xh, stride_ct, stride_st, stride_yt, stride_yh,
                   n_tokens, HALF: tl.constexpr, HALF_PAD: tl.constexpr, BLOCK_T: tl.constexpr,
                   BACKWARD: tl.constexpr):
    """One program: BLOCK_T tokens of one head. BACKWARD applies the transposed rotation."""
    head = tl.program_id(1)
    tok = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, HALF_PAD)
    ok = (tok < n_tokens)[:, None] & (cols < HALF)[None, :]
    tok64 = tok.to(tl.int64)[:, None]
    x_ptr = X + tok64 * stride_xt + head * stride_xh + cols[None, :]
    x1 = tl.load(x_ptr, mask=ok, other=0.0).to(tl.float32)
    x2 = tl.load(x_ptr + HALF, mask=ok, other=0.0).to(tl.float32)
    c_ptr = COS + tok64 * stride_ct + cols[None, :]
    s_ptr = SIN + tok64 * stride_st + cols[None, :]
    cos1 = tl.load(c_ptr, mask=ok, other=0.0).to(tl.float32)
    cos2 = tl.load(c_ptr + HALF, mask=ok, other=0.0).to(tl.float32)
    sin1 = tl.load(s_ptr, mask=ok, other=0.0).to(tl.float32)
    sin2 = tl.load(s_ptr + HALF, mask=ok, other=0.0).to(tl.float32)
    if BACKWARD:
        y1 = x1 * cos1 + x2 * sin2
        y2 = x2 * cos2 - x1 * sin1
    else:
        y1 = x1 * cos1 - x2 * sin1
        y2 = x2 * cos2 + x1 * sin2
    y_ptr = Y + tok64 * stride_yt + head * stride_yh + cols[None, :]
    tl.store(y_ptr, _cast(y1, Y.dtype.element_ty), mask=ok)
    tl.store(y_ptr + HALF, _cast(y2, Y.dtype.element_ty), mask=ok)


def _rotary_launch(x, cos, sin, backward):
    n_tokens, n_heads, head_dim = x.shape
    y = torch.empty((n_tokens, n_heads, head_dim), dtype=x.dtype, device=x.device)
    if n_tokens == 0 or n_heads == 0:
        return y
    half_pad = next_pow2(head_dim // 2)
    block_t = max(1, min(64, 2048 // half_pad)) if x.is_cuda else 64
    rotary_kernel[(_cdiv(n_tokens, block_t), n_heads)](
        x, cos, sin, y, x.stride(0), x.stride(1), cos.stride(0), sin.stride(0), y.stride(0), y.stride(1),
        n_tokens, HALF=head_dim // 2, HALF_PAD=half_pad, BLOCK_T=block_t, BACKWARD=backward,
        num_warps=4 if x.is_cuda else 1)
    return y


class _RotaryFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        return _rotary_launch(x, cos, sin, backward=False)

    @staticmethod
    def backward(ctx, dy):
        cos, sin = ctx.saved_tensors
        if dy.stride(-1) != 1:
            dy = dy.contiguous()
        return _rotary_launch(dy, cos, sin, backward=True), None, None


def apply_rotary(x, cos, sin):
    """x: (tokens, heads, head_dim) (any token/head strides); cos, sin: (tokens, head_dim).
    Returns x*cos + rotate_half(x)*sin in x's dtype (a new contiguous tensor)."""
    if x.dim() != 3 or x.shape[-1] % 2 != 0 or cos.shape != (x.shape[0], x.shape[2]) or sin.shape != cos.shape:
        raise ValueError(f"apply_rotary: need x (tokens, heads, even head_dim) and cos/sin (tokens, head_dim); "
                         f"got x {tuple(x.shape)}, cos {tuple(cos.shape)}, sin {tuple(sin.shape)}")
    if _use_triton(x):
        if x.stride(-1) != 1:
            x = x.contiguous()
        cos = cos if cos.stride(-1) == 1 else cos.contiguous()
        sin = sin if sin.stride(-1) == 1 else sin.contiguous()
        return _RotaryFn.apply(x, cos, sin)
    return apply_rotary_torch(x, cos, sin)


# =============================================================================
# 4. SwiGLU
# =============================================================================

def swiglu_torch(gate, up):
    return F.silu(gate) * up


@_jit
def swiglu_fwd_kernel(G, U, Y, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    g = tl.load(G + offs, mask=ok, other=0.0).to(tl.float32)
    u = tl.load(U + offs, mask=ok, other=0.0).to(tl.float32)
    tl.store(Y + offs, _cast(g * tl.sigmoid(g) * u, Y.dtype.element_ty), mask=ok)


@_jit
def swiglu_bwd_kernel(G, U, DY, DG, DU, n, BLOCK: tl.constexpr):
    """d silu(g)/dg = sig(g) * (1 + g * (1 - sig(g)))."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    g = tl.load(G + offs, mask=ok, other=0.0).to(tl.float32)
    u = tl.load(U + offs, mask=ok, other=0.0).to(tl.float32)
    dy = tl.load(DY + offs, mask=ok, other=0.0).to(tl.float32)
    sig = tl.sigmoid(g)
    tl.store(DU + offs, _cast(dy * g * sig, DU.dtype.element_ty), mask=ok)
    tl.store(DG + offs, _cast(dy * u * sig * (1.0 + g * (1.0 - sig)), DG.dtype.element_ty), mask=ok)


def _elementwise_block(t):
    return 1024 if t.is_cuda else 4096


class _SwiGLUFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up):
        gate, up = gate.contiguous(), up.contiguous()
        y = torch.empty_like(gate)
        n, block = gate.numel(), _elementwise_block(gate)
        if n > 0:
            swiglu_fwd_kernel[(_cdiv(n, block),)](gate, up, y, n, BLOCK=block)
        ctx.save_for_backward(gate, up)
        return y

    @staticmethod
    def backward(ctx, dy):
        gate, up = ctx.saved_tensors
        dy = dy.contiguous()
        dg, du = torch.empty_like(gate), torch.empty_like(up)
        n, block = gate.numel(), _elementwise_block(gate)
        if n > 0:
            swiglu_bwd_kernel[(_cdiv(n, block),)](gate, up, dy, dg, du, n, BLOCK=block)
        return dg, du


def swiglu(gate, up):
    """silu(gate) * up (the SwiGLU MLP's gating), elementwise; gate and up of one shape and dtype."""
    if gate.shape != up.shape or gate.dtype != up.dtype:
        raise ValueError(f"swiglu: gate {tuple(gate.shape)} {gate.dtype} and up {tuple(up.shape)} {up.dtype} "
                         "must match in shape and dtype")
    if _use_triton(gate):
        return _SwiGLUFn.apply(gate, up)
    return swiglu_torch(gate, up)


# =============================================================================
# 5. Linear + cross-entropy, chunked
# =============================================================================
#
# loss = CE(hidden @ weight.T, labels) with a 151,680-token vocabulary: the full fp32 logits of
# an 8K-token pack would take 5 GB (and as much again for their gradient). The Triton path walks
# the tokens in chunks: logits of a chunk (cuBLAS matmul, in hidden's dtype, as the reference
# computes them), then one Triton kernel per chunk computes each row's loss and overwrites the
# logits in place with their gradient softmax - onehot; two more matmuls turn that into the
# chunk's dHidden and its share of dWeight. Gradients are computed during the forward pass
# (the loss is a scalar, so the backward pass only rescales them by grad_output), as in
# Liger-Kernel's FusedLinearCrossEntropy.

def linear_cross_entropy_torch(hidden, weight, labels, ignore_index=-100, reduction="mean"):
    """The definition: materialises the (tokens, vocab) fp32 logits."""
    logits = (hidden @ weight.T).float()
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                           ignore_index=ignore_index, reduction=reduction)


@_jit
def ce_chunk_kernel(LOGITS, LABELS, LOSS, stride_row, n_vocab, ignore_index,
                     BLOCK_V: tl.constexpr, WRITE_GRAD: tl.constexpr):
    """One row per program. loss = logsumexp(x) - x[label] (0 for ignored rows); if WRITE_GRAD,
    the row's logits are overwritten with d loss / d x = softmax(x) - onehot(label) (0 if ignored)."""
    row = tl.program_id(0).to(tl.int64)
    row_ptr = LOGITS + row * stride_row
    label = tl.load(LABELS + row)
    cols = tl.arange(0, BLOCK_V)
    # pass 1: online logsumexp over vocabulary blocks, per lane, merged at the end
    m = tl.full([BLOCK_V], float("-inf"), dtype=tl.float32)
    s = tl.zeros([BLOCK_V], dtype=tl.float32)
    for start in range(0, n_vocab, BLOCK_V):
        x = tl.load(row_ptr + start + cols, mask=start + cols < n_vocab, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, x)
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # lanes that saw only padding
        s = s * tl.exp(m - m_use) + tl.exp(x - m_use)
        m = m_new
    m_row = tl.max(m, 0)
    lse = m_row + tl.log(tl.sum(s * tl.exp(m - m_row), 0))
    valid = label != ignore_index
    x_label = tl.load(row_ptr + label, mask=valid, other=0.0).to(tl.float32)
    tl.store(LOSS + row, tl.where(valid, lse - x_label, 0.0))
    if WRITE_GRAD:
        for start in range(0, n_vocab, BLOCK_V):
            ok = start + cols < n_vocab
            x = tl.load(row_ptr + start + cols, mask=ok, other=0.0).to(tl.float32)
            grad = tl.exp(x - lse) - tl.where(start + cols == label, 1.0, 0.0)
            grad = tl.where(valid, grad, 0.0)
            tl.store(row_ptr + start + cols, _cast(grad, LOGITS.dtype.element_ty), mask=ok)


def default_chunk_rows(n_rows, vocab, elem_size):
    """Rows per chunk so that a chunk's logits take at most ~1 GiB (a power of two >= 16): 2048
    rows at vocab 151,680 in bf16, so an 8K-token pack takes 4 chunks (each chunk adds one pass
    over the fp32 dWeight accumulator, 2.5 GB for MiMo-7B's head). Also the chunk of
    MiMoVL.token_logprobs (fp32 logits: 1024 rows)."""
    rows = max(16, (1 << 30) // max(1, vocab * elem_size))
    return min(next_pow2(n_rows), 1 << (rows.bit_length() - 1))


def _linear_cross_entropy_chunked(hidden, weight, labels, ignore_index, chunk_size, need_grad_h,
                                  need_grad_w):
    """Returns (per-row losses fp32, dHidden, dWeight) for the *sum* of the row losses."""
    n_rows, vocab = hidden.shape[0], weight.shape[0]
    chunk = chunk_size or default_chunk_rows(n_rows, vocab, hidden.element_size())
    loss_rows = torch.empty(n_rows, dtype=torch.float32, device=hidden.device)
    grad_h = torch.empty_like(hidden) if need_grad_h else None
    single = n_rows <= chunk
    grad_w = None
    if need_grad_w and not single:  # accumulated over chunks in fp32, rounded once at the end
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
    block_v = min(next_pow2(vocab), 4096 if hidden.is_cuda else 1024)
    for c0 in range(0, n_rows, chunk):
        h = hidden[c0:c0 + chunk]  # (C, H)
        logits = h @ weight.T  # (C, V) in hidden's dtype
        ce_chunk_kernel[(h.shape[0],)](logits, labels[c0:c0 + chunk], loss_rows[c0:c0 + chunk],
                                        logits.stride(0), vocab, ignore_index, BLOCK_V=block_v,
                                        WRITE_GRAD=need_grad_h or need_grad_w,
                                        num_warps=8 if hidden.is_cuda else 1)
        if need_grad_h:
            torch.matmul(logits, weight, out=grad_h[c0:c0 + chunk])  # (C, H)
        if need_grad_w:
            if single:
                grad_w = logits.T @ h  # (V, H)
            else:
                grad_w += (logits.T @ h).float()
    return loss_rows, grad_h, grad_w


class _LinearCrossEntropyFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, ignore_index, reduction, chunk_size):
        loss_rows, grad_h, grad_w = _linear_cross_entropy_chunked(
            hidden, weight, labels, ignore_index, chunk_size, ctx.needs_input_grad[0], ctx.needs_input_grad[1])
        total = loss_rows.sum()
        if reduction == "mean":
            count = (labels != ignore_index).sum()
            ctx.save_for_backward(grad_h, grad_w, count)
            total = total / count
        else:
            ctx.save_for_backward(grad_h, grad_w, None)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w, count = ctx.saved_tensors
        scale = grad_out if count is None else grad_out / count
        dh = None if grad_h is None else grad_h * scale.to(grad_h.dtype)
        dw = None if grad_w is None else (grad_w * scale).to(ctx.weight_dtype)
        return dh, dw, None, None, None, None


def _ce_chunk_torch(h, weight, y, ignore_index):
    return F.cross_entropy((h @ weight.T).float(), y, ignore_index=ignore_index, reduction="sum")


def _linear_cross_entropy_torch_chunked(hidden, weight, labels, ignore_index, reduction, chunk_size):
    """The PyTorch path (CPU, or no Triton): the reference's arithmetic, one chunk of rows at a
    time; under autograd each chunk is recomputed in the backward pass (activation
    checkpointing), so neither the forward nor the backward ever holds [tokens, vocab] logits."""
    hidden = hidden.reshape(-1, hidden.shape[-1])
    labels = labels.reshape(-1)
    chunk = chunk_size or default_chunk_rows(hidden.shape[0], weight.shape[0], 4)
    grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    total = hidden.new_zeros((), dtype=torch.float)
    for a in range(0, hidden.shape[0], chunk):
        h, y = hidden[a:a + chunk], labels[a:a + chunk]
        if grad:
            total = total + torch.utils.checkpoint.checkpoint(_ce_chunk_torch, h, weight, y, ignore_index,
                                                              use_reentrant=False)
        else:
            total = total + _ce_chunk_torch(h, weight, y, ignore_index)
    return total / (labels != ignore_index).sum() if reduction == "mean" else total


def linear_cross_entropy(hidden, weight, labels, ignore_index=-100, reduction="mean", chunk_size=None):
    """Cross-entropy of the logits hidden @ weight.T against labels, without materialising
    [tokens, vocab] logits on the Triton path.

    hidden (..., H), weight (V, H), labels (...) int64 (already shifted: label[i] is the target of
    row i); rows whose label is ignore_index contribute nothing. reduction="sum": sum of row
    losses; "mean": that sum / number of non-ignored rows (NaN when there are none, as
    F.cross_entropy). Logits are computed in hidden's dtype, the softmax in fp32 (as the
    reference). chunk_size: rows per chunk (default: ~1 GiB of logits per chunk)."""
    if reduction not in ("mean", "sum"):
        raise ValueError(f"linear_cross_entropy: reduction={reduction!r}, expected 'mean' or 'sum'")
    if weight.dim() != 2 or hidden.shape[-1] != weight.shape[1] or hidden.shape[:-1] != labels.shape:
        raise ValueError(f"linear_cross_entropy: need hidden (..., H), weight (V, H), labels (...); got "
                         f"{tuple(hidden.shape)}, {tuple(weight.shape)}, {tuple(labels.shape)}")
    if not _use_triton(hidden):
        return _linear_cross_entropy_torch_chunked(hidden, weight, labels, ignore_index, reduction, chunk_size)
    hidden = hidden.reshape(-1, hidden.shape[-1])
    labels = labels.reshape(-1).contiguous()
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= weight.shape[0]))
    if bool(bad.any()):  # one host sync per call; an out-of-range label would read out of bounds
        raise ValueError(f"linear_cross_entropy: labels outside [0, {weight.shape[0]}) that are not "
                         f"ignore_index={ignore_index}: {labels[bad][:8].tolist()}")
    if hidden.dtype != weight.dtype:
        raise ValueError(f"linear_cross_entropy: hidden {hidden.dtype} and weight {weight.dtype} dtypes differ")
    if not torch.is_grad_enabled() or not (hidden.requires_grad or weight.requires_grad):
        loss_rows, _, _ = _linear_cross_entropy_chunked(hidden, weight, labels, ignore_index,
                                                        chunk_size, False, False)
        total = loss_rows.sum()
        return total / (labels != ignore_index).sum() if reduction == "mean" else total
    return _LinearCrossEntropyFn.apply(hidden, weight, labels, ignore_index, reduction, chunk_size)


# =============================================================================
# 6. CPU inference: pre-packed bf16 linear weights
# =============================================================================
#
# Decoding multiplies one row by every weight matrix, so it is bound by how fast the weights
# stream through the cores. PyTorch's bf16 matmul on CPUs with native bf16 (oneDNN) re-lays the
# weight out into its blocked format on every call; doing that once ahead of time
# (`mkldnn._reorder_linear_weight`, what torch.compile's CPU backend does) made a 4096x11008
# matrix-vector product ~1.6x faster on the development machine (bench.py --cpu measures the
# effect end to end). The packed tensor replaces the weight in place (no second copy): the model
# is then inference-only, and saving or training it is refused.

def _packed_linear_forward(module, x):
    return torch.ops.mkldnn._linear_pointwise(x, module.packed_weight, module.bias, "none", [], "")


def cpu_pack_supported():
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        w = torch.randn(16, 32, dtype=torch.bfloat16)
        x = torch.randn(2, 32, dtype=torch.bfloat16)
        packed = torch.ops.mkldnn._reorder_linear_weight(w, batch_size=1)
        y = torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")
        return bool(torch.allclose(y.float(), (x @ w.T).float(), atol=1e-2))
    except (RuntimeError, AttributeError):
        return False


def pack_linear_weights_for_cpu(model):
    """Pack every bf16 nn.Linear weight of `model` (on CPU) for oneDNN; returns how many were
    packed (0 where the CPU/PyTorch build cannot). Sets `model.inference_only = True`."""
    if not cpu_pack_supported():
        return 0
    n = 0
    with torch.no_grad():
        for m in model.modules():
            if (isinstance(m, torch.nn.Linear) and "weight" in m._parameters
                    and m.weight.dtype == torch.bfloat16 and m.weight.device.type == "cpu"):
                # the packed copy (an opaque oneDNN tensor) replaces the parameter, whose memory is
                # freed unless another module shares it (a tied embedding keeps it)
                m.packed_weight = torch.ops.mkldnn._reorder_linear_weight(m.weight.detach(), batch_size=1)
                del m._parameters["weight"]
                m.forward = _packed_linear_forward.__get__(m)
                n += 1
    model.inference_only = True
    return n

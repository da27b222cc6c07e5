"""
kernels.py — the hot path of both towers, in one place.

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
in flash-attention: the last query row sees every key.

This file holds the readable PyTorch reference of every op. The Triton kernels (issue: "Triton
kernels for the packed attention hot path") live beside their references, and `varlen_attention`
is the single dispatch point: `MIMOVL_KERNELS=torch|triton` forces a path.
"""

import os

import torch
import torch.nn.functional as F


# -----------------------------------------------------------------------------
# PyTorch references

def varlen_attention_torch(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                           causal, scale):
    """Per-segment SDPA on 4-D tensors. On CPU this is the fast path: SDPA takes its fused
    kernel only for 4-D inputs, and one call with a block-diagonal mask over the whole pack was
    measured up to 100x slower than this loop (../shared/MACHINE-NOTES.md)."""
    n_heads, n_kv_heads = q.shape[1], k.shape[1]
    group = n_heads // n_kv_heads
    out = torch.empty_like(q)
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for i in range(len(cq) - 1):
        q0, q1, k0, k1 = cq[i], cq[i + 1], ck[i], ck[i + 1]
        if q1 == q0:
            continue
        qs = q[q0:q1].transpose(0, 1).unsqueeze(0)  # (1, nh, Lq, hd)
        ks = k[k0:k1].transpose(0, 1).unsqueeze(0)  # (1, nkv, Lk, hd)
        vs = v[k0:k1].transpose(0, 1).unsqueeze(0)
        if group > 1:
            ks = ks.repeat_interleave(group, dim=1)  # (1, nh, Lk, hd)
            vs = vs.repeat_interleave(group, dim=1)
        lq, lk = q1 - q0, k1 - k0
        mask, is_causal = None, False
        if causal and lq == lk:
            is_causal = True
        elif causal:
            # bottom-right aligned: query row r sees keys [0, lk - lq + r]
            rows = torch.arange(lq, device=q.device)[:, None] + (lk - lq)
            mask = torch.arange(lk, device=q.device)[None, :] <= rows  # (Lq, Lk) bool
        o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, is_causal=is_causal,
                                           scale=scale)  # (1, nh, Lq, hd)
        out[q0:q1] = o[0].transpose(0, 1)
    return out


def rms_norm_torch(x, weight, eps):
    """RMSNorm as Qwen2 computes it: statistics in fp32, scale applied in the input dtype."""
    dtype = x.dtype
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(dtype)


# -----------------------------------------------------------------------------
# Dispatch

def _backend(t):
    forced = os.environ.get("MIMOVL_KERNELS", "").strip().lower()
    if forced not in ("", "torch", "triton"):
        raise ValueError(f"MIMOVL_KERNELS={forced!r}: expected 'torch' or 'triton'")
    return forced or "torch"


def varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                     causal=False, scale=None):
    """Packed variable-length attention (see the module docstring for shapes)."""
    if scale is None:
        scale = q.shape[-1] ** -0.5
    return varlen_attention_torch(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                  max_seqlen_k, causal, scale)


def rms_norm(x, weight, eps):
    return rms_norm_torch(x, weight, eps)

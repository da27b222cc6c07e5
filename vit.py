"""
vit.py — the native-resolution vision tower of MiMo-VL (Qwen2.5-ViT) and its MLP projector.

    pixel_values [N, 1176]  --patch embed-->  [N, C]  --32 blocks (window / full attention, 2D RoPE)-->
    [N, C]  --patch merger (2x2 concat + MLP)-->  [N/4, out_hidden]   (raster order per image/video)

MiMo-VL keeps Qwen2.5-VL's ViT unchanged (MiMo-VL report §2.1; Qwen2.5-VL report §2.1). The
reference behaviour is transformers' `Qwen2_5_VisionTransformerPretrainedModel`
(`modeling_qwen2_5_vl.py`); module and parameter names here match the
checkpoint keys (`visual.patch_embed.proj.weight`, `visual.blocks.B.attn.qkv.weight`, ...), so loading
is a plain name-for-name copy.

Every image or video arrives as a sequence of 14x14 patches in *merge-block order* (as
transformers' `Qwen2VLImageProcessor` lays them out): the four patches of each 2x2 merge unit are
consecutive. Images of any size and videos are packed into one sequence; attention never crosses an
item, a temporal group (frame pair) or, in the windowed blocks, a 112-px window (`get_window_index`).
All attention goes through `kernels.varlen_attention`.
"""

from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from kernels import apply_rotary, rms_norm, swiglu, varlen_attention


@dataclass
class VisionConfig:
    depth: int = 32
    hidden_size: int = 1280
    intermediate_size: int = 3420
    num_heads: int = 16
    in_channels: int = 3
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    window_size: int = 112                    # pixels; 112 / 14 / 2 = 4x4 merged tokens per window
    fullatt_block_indexes: list = field(default_factory=lambda: [7, 15, 23, 31])
    out_hidden_size: int = 4096               # = the LM's hidden size
    tokens_per_second: float = 2              # M-RoPE temporal spacing for videos (`get_rope_index`)
    hidden_act: str = "silu"
    rope_theta: float = 10000.0               # hard-coded in the reference, not in config.json

    @property
    def head_dim(self):
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self):                      # 3 * 2 * 14 * 14 = 1176
        return self.in_channels * self.temporal_patch_size * self.patch_size ** 2

    def validate(self):
        def bad(name, why):
            raise ValueError(f"vision_config.{name}={getattr(self, name)!r}: {why}")
        for name in ("depth", "hidden_size", "intermediate_size", "num_heads", "patch_size",
                     "temporal_patch_size", "spatial_merge_size", "out_hidden_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                bad(name, "must be a positive integer")
        if self.hidden_size % self.num_heads:
            bad("hidden_size", f"must be divisible by num_heads={self.num_heads}")
        if self.head_dim % 4:
            bad("num_heads", "head_dim must be a multiple of 4 for the 2D rotary embedding")
        if self.window_size % (self.patch_size * self.spatial_merge_size):
            bad("window_size", f"must be a multiple of patch_size*spatial_merge_size="
                f"{self.patch_size * self.spatial_merge_size}")
        for i in self.fullatt_block_indexes:
            if not 0 <= i < self.depth:
                bad("fullatt_block_indexes", f"index {i} is outside 0..{self.depth - 1}")
        if self.hidden_act != "silu":
            bad("hidden_act", "only 'silu' (SwiGLU) is implemented")
        return self


# -----------------------------------------------------------------------------
# Layout: rotary positions, windows and attention segments for a packed batch of items

def check_grid(pixel_values, grid_thw, cfg, what="pixel_values"):
    """User-facing checks that pixel_values rows agree with grid_thw (the layout of `Qwen2VLImageProcessor`)."""
    if grid_thw.ndim != 2 or grid_thw.shape[1] != 3:
        raise ValueError(f"{what}: grid_thw must have shape [n_items, 3], got {tuple(grid_thw.shape)}")
    if pixel_values.ndim != 2 or pixel_values.shape[1] != cfg.patch_dim:
        raise ValueError(f"{what} must have shape [n_patches, {cfg.patch_dim}] "
                         f"(3 x {cfg.temporal_patch_size} x {cfg.patch_size} x {cfg.patch_size}), "
                         f"got {tuple(pixel_values.shape)}")
    m = cfg.spatial_merge_size
    for i, (t, h, w) in enumerate(grid_thw.tolist()):
        if t <= 0 or h <= 0 or w <= 0 or h % m or w % m:
            raise ValueError(f"{what}: grid_thw[{i}] = ({t}, {h}, {w}) is invalid: every side must be "
                             f"positive and h, w multiples of spatial_merge_size={m} "
                             f"(resize images to multiples of {m * cfg.patch_size} px)")
    expected = int(grid_thw.prod(-1).sum())
    if pixel_values.shape[0] != expected:
        raise ValueError(f"{what} has {pixel_values.shape[0]} patch rows but grid_thw "
                         f"{grid_thw.tolist()} describes {expected} (sum of t*h*w)")


def rotary_positions(grid_thw, merge):
    """(row, col) patch coordinates of every patch, in merge-block order (transformers `rot_pos_emb`). -> [N, 2]"""
    pos = []
    for t, h, w in grid_thw.tolist():
        rows = torch.arange(h).view(h // merge, merge, 1, 1).expand(-1, -1, w // merge, merge)
        cols = torch.arange(w).view(1, 1, w // merge, merge).expand(h // merge, merge, -1, -1)
        # (merged row, sub row, merged col, sub col) -> (merged row, merged col, sub row, sub col)
        rc = torch.stack([rows.permute(0, 2, 1, 3).flatten(), cols.permute(0, 2, 1, 3).flatten()], -1)
        pos.append(rc.repeat(t, 1))  # every temporal group reuses the same 2D positions
    return torch.cat(pos)


def window_layout(grid_thw, merge, window):
    """`window_index` and `cu_window_seqlens` (transformers `get_window_index`).

    window_index: a permutation of the merged tokens of the whole pack that lists them window by
    window (frames in order, windows in raster order, tokens in raster order inside a window).
    cu_window_seqlens: patch offsets (x merge**2) where each non-empty window starts/ends.
    `window` is the window side in merged tokens (112 px / 14 / 2 = 4).
    """
    window_index, cu = [], [0]
    offset = 0
    for t, h, w in grid_thw.tolist():
        lh, lw = h // merge, w // merge
        index = torch.arange(t * lh * lw).view(t, lh, lw)
        # pad bottom/right with -1 up to whole windows; the reference always adds
        # `window - lh % window` rows, a full empty window when lh is already a multiple (harmless)
        pad_h, pad_w = window - lh % window, window - lw % window
        nh, nw = (lh + pad_h) // window, (lw + pad_w) // window
        index = F.pad(index, (0, pad_w, 0, pad_h), value=-1)
        index = index.view(t, nh, window, nw, window).permute(0, 1, 3, 2, 4).reshape(t, nh * nw, -1)
        sizes = (index >= 0).sum(-1).flatten()          # merged tokens per window
        index = index.flatten()
        window_index.append(index[index >= 0] + offset)
        for s in sizes.tolist():
            if s:                                       # drop empty windows
                cu.append(cu[-1] + s * merge * merge)
        offset += t * lh * lw
    return torch.cat(window_index), torch.tensor(cu, dtype=torch.int32)


def frame_seqlens(grid_thw):
    """Full-attention segments: one per temporal group of each item (transformers'
    `Qwen2_5_VisionTransformerPretrainedModel.forward`, `cu_seqlens`)."""
    lens = torch.repeat_interleave(grid_thw[:, 1] * grid_thw[:, 2], grid_thw[:, 0])
    return F.pad(lens.cumsum(0, dtype=torch.int32), (1, 0))


# -----------------------------------------------------------------------------
# Modules

class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        return rms_norm(x, self.weight, self.eps)


class PatchEmbed(nn.Module):
    """Conv3d(3 -> C, kernel = stride = (2, 14, 14)) over one patch == one matmul with the
    flattened kernel (transformers `Qwen2_5_VisionPatchEmbed`). The weight keeps the Conv3d shape so
    checkpoints load as-is."""

    def __init__(self, cfg):
        super().__init__()
        self.proj = nn.Conv3d(cfg.in_channels, cfg.hidden_size,
                              kernel_size=(cfg.temporal_patch_size, cfg.patch_size, cfg.patch_size),
                              stride=(cfg.temporal_patch_size, cfg.patch_size, cfg.patch_size), bias=False)

    def forward(self, x):  # (N, 1176) -> (N, C)
        w = self.proj.weight
        return x.to(w.dtype) @ w.view(w.shape[0], -1).t()


class VisionAttention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.num_heads, self.head_dim = cfg.num_heads, cfg.head_dim
        self.qkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size, bias=True)
        self.proj = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=True)

    def forward(self, x, cu_seqlens, max_seqlen, cos, sin):
        n = x.shape[0]
        q, k, v = self.qkv(x).view(n, 3, self.num_heads, self.head_dim).unbind(1)  # each (N, nh, hd)
        # rotate-half, in fp32 (transformers `apply_rotary_pos_emb_vision`)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        o = varlen_attention(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen,
                             causal=False, scale=self.head_dim ** -0.5)           # (N, nh, hd)
        return self.proj(o.reshape(n, -1))


def fuse_linears(*linears):
    """One nn.Linear computing the concatenated outputs of `linears` (same input size)."""
    first = linears[0]
    bias = first.bias is not None
    fused = nn.Linear(first.in_features, sum(m.out_features for m in linears), bias=bias,
                      device=first.weight.device, dtype=first.weight.dtype)
    fused.weight.copy_(torch.cat([m.weight for m in linears]))
    if bias:
        fused.bias.copy_(torch.cat([m.bias for m in linears]))
    return fused.requires_grad_(False)


class MLP(nn.Module):
    """SwiGLU MLP, down(silu(gate(x)) * up(x)): with biases in the ViT, without in the LM."""

    def __init__(self, dim, hidden, bias):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=bias)
        self.up_proj = nn.Linear(dim, hidden, bias=bias)
        self.down_proj = nn.Linear(hidden, dim, bias=bias)

    def forward(self, x):
        if hasattr(self, "gate_up_proj"):       # fused for inference (fuse_for_inference)
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
            return self.down_proj(swiglu(gate, up))
        return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))

    @torch.no_grad()
    def fuse_for_inference(self):
        """gate and up as one matmul (one pass over x, one larger matrix-vector product when
        decoding). The separate weights are dropped: the module is then inference-only."""
        self.gate_up_proj = fuse_linears(self.gate_proj, self.up_proj)
        del self.gate_proj, self.up_proj


class VisionBlock(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.norm1 = RMSNorm(cfg.hidden_size, eps=1e-6)
        self.attn = VisionAttention(cfg)
        self.norm2 = RMSNorm(cfg.hidden_size, eps=1e-6)
        self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size, bias=True)

    def forward(self, x, cu_seqlens, max_seqlen, cos, sin):
        x = x + self.attn(self.norm1(x), cu_seqlens, max_seqlen, cos, sin)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nn.Module):
    """The MLP projector: RMSNorm per patch, concat each 2x2 merge unit, Linear-GELU-Linear
    (transformers `Qwen2_5_VLPatchMerger`)."""

    def __init__(self, cfg):
        super().__init__()
        self.merged_dim = cfg.hidden_size * cfg.spatial_merge_size ** 2
        self.ln_q = RMSNorm(cfg.hidden_size, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(self.merged_dim, self.merged_dim), nn.GELU(),
                                 nn.Linear(self.merged_dim, cfg.out_hidden_size))

    def forward(self, x):  # (N, C) -> (N/4, out_hidden)
        return self.mlp(self.ln_q(x).view(-1, self.merged_dim))


class VisionTransformer(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg.validate()
        self.patch_embed = PatchEmbed(cfg)
        self.blocks = nn.ModuleList(VisionBlock(cfg) for _ in range(cfg.depth))
        self.merger = PatchMerger(cfg)
        self.gradient_checkpointing = False

    def rotary(self, positions, device):
        """2D RoPE angles: 20 frequencies for the row, 20 for the column, duplicated (transformers `rot_pos_emb`)."""
        half = self.cfg.head_dim // 2
        inv_freq = 1.0 / (self.cfg.rope_theta ** (torch.arange(0, half, 2, dtype=torch.float, device=device) / half))
        pos = positions.to(device=device, dtype=torch.float)
        angles = torch.cat([pos[:, :1] * inv_freq, pos[:, 1:] * inv_freq], dim=-1)  # (N, hd/2)
        emb = torch.cat([angles, angles], dim=-1)                                   # (N, hd)
        return emb.cos(), emb.sin()

    def forward(self, pixel_values, grid_thw):
        cfg = self.cfg
        grid_thw = torch.as_tensor(grid_thw).long().cpu()
        check_grid(pixel_values, grid_thw, cfg)
        m, unit = cfg.spatial_merge_size, cfg.spatial_merge_size ** 2
        device = pixel_values.device
        x = self.patch_embed(pixel_values)                                  # (N, C)
        n = x.shape[0]

        # Reorder the patch sequence window by window, moving whole 2x2 merge units (transformers `get_window_index`).
        window_index, cu_window = window_layout(grid_thw, m, cfg.window_size // m // cfg.patch_size)
        window_index = window_index.to(device)
        x = x.view(n // unit, unit, -1)[window_index].view(n, -1)
        pos = rotary_positions(grid_thw, m).view(n // unit, unit, 2)[window_index.cpu()].view(n, 2)
        cos, sin = self.rotary(pos, device)

        cu_full = frame_seqlens(grid_thw)
        segs = {
            "window": (cu_window.to(device), int((cu_window[1:] - cu_window[:-1]).max())),
            "full": (cu_full.to(device), int((cu_full[1:] - cu_full[:-1]).max())),
        }
        for i, block in enumerate(self.blocks):
            cu, max_len = segs["full" if i in cfg.fullatt_block_indexes else "window"]
            if self.gradient_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(block, x, cu, max_len, cos, sin, use_reentrant=False)
            else:
                x = block(x, cu, max_len, cos, sin)

        x = self.merger(x)                                                  # (N/4, out_hidden)
        return x[torch.argsort(window_index)]                              # back to raster order

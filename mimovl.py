"""
mimovl.py — MiMo-VL-7B: configs, the MiMo language model, M-RoPE, the full vision-language model,
KV-cache generation and checkpoint load/save. It is a library chapter, not a script; to chat with a
checkpoint from the command line or from Python, use chat.py.

    model = MiMoVL.from_pretrained("path/to/MiMo-VL-7B-RL", dtype=torch.bfloat16, device="cuda")
    new_ids = model.generate(**batch, max_new_tokens=64)   # batch: processor.Processor's tensors
    model.save_pretrained("out/")                           # a folder transformers loads too

MiMo-VL-7B = Qwen2.5-ViT (vit.py) + MLP projector (vit.PatchMerger) + MiMo-7B, a Qwen2-style decoder
(GQA, q/k/v bias, SwiGLU, RMSNorm) with multimodal rotary positions (M-RoPE). The checkpoints are
`Qwen2_5_VLForConditionalGeneration` checkpoints (transformers' `configuration_qwen2_5_vl.py` and
`modeling_qwen2_5_vl.py`); transformers 4.57 is the parity reference. Module names mirror the legacy checkpoint keys (`model.layers.N.self_attn.q_proj.weight`,
`visual.blocks.B.attn.qkv.weight`, `lm_head.weight`), so weights map name for name.

Loading is strict and shard by shard onto the meta device (plan_folder / load_sources).
`MiMoVL.from_pretrained(dir)` reads one Qwen2.5-VL-format folder; `MiMoVL.from_towers(vit_dir,
lm_dir)` builds MiMo-VL's start point (MiMo-VL report §2.1): the ViT of a Qwen2.5-VL checkpoint,
the LM of a text checkpoint such as MiMo-7B-Base (its multi-token-prediction layers dropped) and
a fresh projector.

Internally the language model works on *packed* tokens: a batch of rows (left-padded or not) is
flattened to the attended tokens only, and `cu_seqlens` marks where each sequence starts. A packed
training row of several documents is the same thing with more boundaries. All attention goes
through `kernels.varlen_attention`.
"""

import math
import os
import sys
from collections import namedtuple
from dataclasses import asdict, dataclass, field, fields

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from checkpoint_files import check_json_fields, read_json_file, write_file_atomic, write_json_atomic
from kernels import apply_rotary, default_chunk_rows, linear_cross_entropy, varlen_attention
from vit import MLP, RMSNorm, VisionConfig, VisionTransformer, fuse_linears


# -----------------------------------------------------------------------------
# Configs

@dataclass
class TextConfig:
    vocab_size: int = 151680
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 36
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    rms_norm_eps: float = 1e-5
    rope_theta: float = 640000.0
    mrope_section: list = field(default_factory=lambda: [16, 24, 24])   # (t, h, w) frequency split
    max_position_embeddings: int = 128000
    tie_word_embeddings: bool = False
    hidden_act: str = "silu"

    @property
    def head_dim(self):
        return self.hidden_size // self.num_attention_heads


@dataclass
class MiMoVLConfig:
    text: TextConfig = field(default_factory=TextConfig)
    vision: VisionConfig = field(default_factory=VisionConfig)
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    bos_token_id: int = None      # read from config.json when present; None otherwise
    eos_token_id: int = None
    pad_token_id: int = None

    PRESETS = ("mimo-vl-7b", "tiny")

    @classmethod
    def preset(cls, name):
        if name == "mimo-vl-7b":  # the XiaomiMiMo/MiMo-VL-7B-RL config.json
            return cls(bos_token_id=151643, eos_token_id=151645, pad_token_id=151643).validate()
        if name == "tiny":        # ~4 M parameters, for CPU reproductions and tests
            return cls(
                text=TextConfig(vocab_size=1024, hidden_size=256, intermediate_size=688,
                                num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                                rope_theta=10000.0, mrope_section=[8, 12, 12],
                                max_position_embeddings=8192, tie_word_embeddings=False),
                vision=VisionConfig(depth=4, hidden_size=128, intermediate_size=256, num_heads=2,
                                    fullatt_block_indexes=[1, 3], out_hidden_size=256),
                image_token_id=6, video_token_id=7, vision_start_token_id=3, vision_end_token_id=4,
                bos_token_id=0, eos_token_id=2, pad_token_id=0).validate()
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(cls.PRESETS)}")

    def validate(self):
        t, v = self.text, self.vision

        def bad(name, why):
            raise ValueError(f"config: {name} {why}")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads"):
            if not isinstance(getattr(t, name), int) or getattr(t, name) <= 0:
                bad(f"{name}={getattr(t, name)!r}", "must be a positive integer")
        if t.hidden_size % t.num_attention_heads:
            bad(f"hidden_size={t.hidden_size}", f"must be divisible by num_attention_heads={t.num_attention_heads}")
        if t.num_attention_heads % t.num_key_value_heads:
            bad(f"num_attention_heads={t.num_attention_heads}",
                f"must be a multiple of num_key_value_heads={t.num_key_value_heads}")
        for name in ("rope_theta", "rms_norm_eps"):
            if not isinstance(getattr(t, name), (int, float)) or not 0 < getattr(t, name) < math.inf:
                bad(f"{name}={getattr(t, name)!r}", "must be a positive number")
        if not isinstance(t.max_position_embeddings, int) or t.max_position_embeddings <= 0:
            bad(f"max_position_embeddings={t.max_position_embeddings!r}", "must be a positive integer")
        if len(t.mrope_section) != 3 or sum(t.mrope_section) != t.head_dim // 2 or min(t.mrope_section) < 0:
            bad(f"mrope_section={t.mrope_section}", f"must be 3 numbers summing to head_dim/2={t.head_dim // 2}")
        if t.hidden_act != "silu":
            bad(f"hidden_act={t.hidden_act!r}", "is not supported (only 'silu')")
        v.validate()
        if v.out_hidden_size != t.hidden_size:
            bad(f"vision_config.out_hidden_size={v.out_hidden_size}", f"must equal hidden_size={t.hidden_size}")
        for name in ("image_token_id", "video_token_id", "vision_start_token_id"):
            if not isinstance(getattr(self, name), int) or not 0 <= getattr(self, name) < t.vocab_size:
                bad(f"{name}={getattr(self, name)}", f"is outside the vocabulary (size {t.vocab_size})")
        return self

    # --- Hugging Face config.json, both layouts ---------------------------------------------

    @classmethod
    def from_hf_dict(cls, d, source="config.json"):
        """Read a `Qwen2_5_VLForConditionalGeneration` config.json: the transformers-4 layout (text
        fields at top level, `rope_scaling`) or the transformers-5 layout (nested `text_config`,
        `rope_parameters`). Every value is type-checked first (checkpoint_files.check_json_fields), so a
        wrong type is an error naming `source`, the key and the value."""
        if not isinstance(d, dict):
            raise ValueError(f"{source} must hold a JSON object, not a {type(d).__name__}")
        check_json_fields(d, source, {"text_config": "object", "vision_config": "object",
                                      "rope_scaling": "object", "tie_word_embeddings": "boolean",
                                      **{k: "integer >= 0" for k in _TOKEN_ID_KEYS if k != "eos_token_id"},
                                      "eos_token_id": "token id or list of token ids"})
        top = dict(d)
        nested = top.get("text_config") or {}
        check_json_fields(nested, source, {**_field_kinds(TextConfig), "rope_scaling": "object", "rope_parameters": "object",
                                           "eos_token_id": "token id or list of token ids"}, "text_config.")
        check_json_fields(top, source, _field_kinds(TextConfig))
        txt = {**top, **nested}   # nested values win over top-level ones
        rope_kinds = {"rope_theta": "number", "mrope_section": "list of integers"}
        for where, d_rope in (("", top), ("text_config.", nested)):
            for key in ("rope_scaling", "rope_parameters"):
                check_json_fields(d_rope.get(key) or {}, source, rope_kinds, f"{where}{key}.")
        rope = txt.get("rope_parameters") or txt.get("rope_scaling") or top.get("rope_scaling") or {}
        t_kw = {f.name: txt[f.name] for f in fields(TextConfig) if f.name in txt and txt[f.name] is not None}
        if "rope_theta" not in t_kw and "rope_theta" in rope:
            t_kw["rope_theta"] = rope["rope_theta"]
        if "mrope_section" in rope:
            t_kw["mrope_section"] = list(rope["mrope_section"])
        vis = top.get("vision_config") or {}
        check_json_fields(vis, source, {**_field_kinds(VisionConfig), "embed_dim": "integer"}, "vision_config.")
        v_kw = {f.name: vis[f.name] for f in fields(VisionConfig) if vis.get(f.name) is not None}
        if "embed_dim" in vis and "hidden_size" not in vis:   # Qwen2-VL naming
            v_kw["hidden_size"] = vis["embed_dim"]
        if isinstance(top.get("tie_word_embeddings"), bool):   # the top-level flag decides tying
            t_kw["tie_word_embeddings"] = top["tie_word_embeddings"]
        text = TextConfig(**{**asdict(TextConfig()), **t_kw})
        if "out_hidden_size" not in v_kw:
            v_kw["out_hidden_size"] = text.hidden_size
        vision = VisionConfig(**{**asdict(VisionConfig()), **v_kw})
        ids = {k: top[k] for k in _TOKEN_ID_KEYS if k != "eos_token_id" and top.get(k) is not None}
        eos = top.get("eos_token_id", txt.get("eos_token_id"))
        if isinstance(eos, list):
            eos = eos[0]
        if eos is not None:
            ids["eos_token_id"] = eos
        try:
            return cls(text=text, vision=vision, **ids).validate()
        except ValueError as e:
            raise ValueError(f"{source}: {e}") from None

    def to_hf_dict(self):
        """transformers-4 layout with a nested `text_config` too, so 4.57 and 5.x both read it."""
        t, v = asdict(self.text), asdict(self.vision)
        rope = {"type": "default", "rope_type": "default", "mrope_section": t.pop("mrope_section")}
        v.pop("rope_theta")
        text = {**t, "rope_scaling": rope, "model_type": "qwen2_5_vl_text", "attention_dropout": 0.0,
                "use_sliding_window": False, "sliding_window": None, "initializer_range": 0.02,
                "use_cache": True}
        ids = {k: getattr(self, k) for k in ("image_token_id", "video_token_id", "vision_start_token_id",
                                             "vision_end_token_id", "bos_token_id", "eos_token_id",
                                             "pad_token_id") if getattr(self, k) is not None}
        return {**text, **ids, "architectures": ["Qwen2_5_VLForConditionalGeneration"],
                "model_type": "qwen2_5_vl", "torch_dtype": "bfloat16",
                "vision_config": {**v, "model_type": "qwen2_5_vl", "initializer_range": 0.02},
                "text_config": {**text, **ids}}


_TOKEN_ID_KEYS = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id",
                  "bos_token_id", "eos_token_id", "pad_token_id")


def _field_kinds(config_class):
    """The JSON kind of each field of a config dataclass, from its annotation (int -> integer...)."""
    kinds = {int: "integer", float: "number", bool: "boolean", str: "string", list: "list of integers"}
    return {f.name: kinds[f.type] for f in fields(config_class) if f.type in kinds}


def tiny_config(scale=1):
    """The tiny preset, widened for scale >= 3 (train_pretrain.py --scale): w = round(sqrt(scale))
    heads per head of the tiny model; head_dim stays 64, so mrope_section [8, 12, 12] still sums
    to head_dim / 2."""
    cfg = MiMoVLConfig.preset("tiny")
    w = max(1, round(scale ** 0.5))
    if w == 1:
        return cfg
    t, v = cfg.text, cfg.vision
    t.num_attention_heads, t.num_key_value_heads = 4 * w, 2 * w
    t.hidden_size = 64 * t.num_attention_heads
    t.intermediate_size = 16 * round(2.6875 * t.hidden_size / 16)
    t.num_hidden_layers = 4 + 2 * (w - 1)
    v.num_heads, v.hidden_size = 2 * w, 128 * w
    v.intermediate_size = 2 * v.hidden_size
    v.depth = 4 + 2 * (w - 1)
    v.fullatt_block_indexes = list(range(1, v.depth, 2))
    v.out_hidden_size = t.hidden_size
    return cfg.validate()


# -----------------------------------------------------------------------------
# M-RoPE position ids (transformers `modeling_qwen2_5_vl.py` get_rope_index; Qwen2.5-VL report)

def get_rope_index(input_ids, cfg, image_grid_thw=None, video_grid_thw=None, second_per_grid_ts=None):
    """3-D (t, h, w) position ids of ONE sequence (1-D LongTensor of attended tokens), with the
    classic transformers-4 / vLLM rule. Returns (position_ids [3, L], rope_delta int, n_images, n_videos).

    Text advances all three ids together; an image of merged grid lh x lw starting at s gets
    t = s, h = s + row, w = s + col; a video adds s + floor(k * second_per_grid_t * tokens_per_second)
    on t for temporal group k. After any vision item text resumes at (max id so far) + 1.
    Note: transformers 4.57 casts second_per_grid_t to an integer before multiplying; we keep the
    float product as vLLM (MiMo's eval engine) does. Both agree whenever second_per_grid_t is a
    whole number, e.g. the 1.0 s of 2-fps sampling.
    """
    m = cfg.vision.spatial_merge_size
    ids = input_ids.tolist()
    L = len(ids)
    img_i = vid_i = 0
    chunks, next_id, st = [], 0, 0
    i = 0
    while i < L:
        tok = ids[i]
        if tok not in (cfg.image_token_id, cfg.video_token_id):
            i += 1
            continue
        if tok == cfg.image_token_id:
            if image_grid_thw is None or img_i >= len(image_grid_thw):
                raise ValueError("input_ids contain more images than image_grid_thw describes")
            t, h, w = (int(x) for x in image_grid_thw[img_i])
            spg = 0.0
            img_i += 1
        else:
            if video_grid_thw is None or vid_i >= len(video_grid_thw):
                raise ValueError("input_ids contain more videos than video_grid_thw describes")
            t, h, w = (int(x) for x in video_grid_thw[vid_i])
            spg = 1.0 if second_per_grid_ts is None else float(second_per_grid_ts[vid_i])
            vid_i += 1
        lh, lw = h // m, w // m
        n_tok = t * lh * lw
        if ids[i:i + n_tok] != [tok] * n_tok:
            raise ValueError(f"a vision item with grid ({t}, {h}, {w}) needs {n_tok} consecutive "
                             f"placeholder tokens {tok} at position {i}; expand each placeholder "
                             f"to t*h*w/{m * m} tokens (the Processor does this)")
        text_len = i - st
        chunks.append(torch.arange(text_len).expand(3, -1) + next_id)
        s = next_id + text_len
        tt = (torch.arange(t) * spg * cfg.vision.tokens_per_second).long()
        pos = torch.stack([tt.view(t, 1, 1).expand(t, lh, lw),
                           torch.arange(lh).view(1, lh, 1).expand(t, lh, lw),
                           torch.arange(lw).view(1, 1, lw).expand(t, lh, lw)]).reshape(3, -1) + s
        chunks.append(pos)
        next_id = int(pos.max()) + 1
        i = st = i + n_tok
    chunks.append(torch.arange(L - st).expand(3, -1) + next_id)
    position_ids = torch.cat(chunks, dim=1)
    return position_ids, int(position_ids.max()) + 1 - L if L else 0, img_i, vid_i


def mrope_cos_sin(position_ids, cfg, dtype):
    """cos/sin (T, head_dim) for 3-D ids (3, T): frequency j uses the t, h or w id according to
    mrope_section, then the angles are duplicated for rotate-half (`apply_multimodal_rotary_pos_emb`
    in transformers' `modeling_qwen2_5_vl.py`)."""
    hd = cfg.head_dim
    device = position_ids.device
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float, device=device) / hd))
    axis = torch.repeat_interleave(torch.arange(3, device=device),
                                   torch.tensor(cfg.mrope_section, device=device))   # (hd/2,)
    pos = position_ids.float()[axis]                                                  # (hd/2, T)
    angles = (pos * inv_freq[:, None]).t()                                            # (T, hd/2)
    emb = torch.cat([angles, angles], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


# -----------------------------------------------------------------------------
# The MiMo language model (Qwen2 decoder)

class KVCache:
    """Preallocated per-layer key/value buffers, (batch, max_len, kv_heads, head_dim) each. Row b
    holds its tokens left-aligned in cache[b, :lengths[b]] (no padding inside the cache)."""

    def __init__(self, n_layers, batch, max_len, n_kv, head_dim, dtype, device):
        self.k = [torch.empty(batch, max_len, n_kv, head_dim, dtype=dtype, device=device) for _ in range(n_layers)]
        self.v = [torch.empty_like(k) for k in self.k]
        self.lengths = torch.zeros(batch, dtype=torch.long)
        self.max_len = max_len

    def reorder(self, index):
        """Keep/duplicate rows (e.g. n samples sharing one prefill)."""
        self.k = [k[index] for k in self.k]
        self.v = [v[index] for v in self.v]
        self.lengths = self.lengths[index.cpu()]


class Attention(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.nh, self.nkv, self.hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, self.nh * self.hd, bias=True)
        self.k_proj = nn.Linear(cfg.hidden_size, self.nkv * self.hd, bias=True)
        self.v_proj = nn.Linear(cfg.hidden_size, self.nkv * self.hd, bias=True)
        self.o_proj = nn.Linear(self.nh * self.hd, cfg.hidden_size, bias=False)

    def forward(self, x, cos, sin, cu_seqlens, max_seqlen, cache=None, layer=0):
        T = x.shape[0]
        if hasattr(self, "qkv_proj"):                   # fused for inference (fuse_for_inference)
            q, k, v = self.qkv_proj(x).split([self.nh * self.hd, self.nkv * self.hd, self.nkv * self.hd], -1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q.view(T, self.nh, self.hd)                 # (T, nh, hd)
        k = k.view(T, self.nkv, self.hd)                # (T, nkv, hd)
        v = v.view(T, self.nkv, self.hd)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)  # M-RoPE, rotate-half
        if cache is None:
            o = varlen_attention(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen,
                                 causal=True, scale=self.hd ** -0.5)
        else:
            o = self._attend_cached(q, k, v, cu_seqlens, cache, layer)
        return self.o_proj(o.reshape(T, -1))

    @torch.no_grad()
    def fuse_for_inference(self):
        """q, k and v as one matmul; drops the separate weights (inference-only)."""
        self.qkv_proj = fuse_linears(self.q_proj, self.k_proj, self.v_proj)
        del self.q_proj, self.k_proj, self.v_proj

    def _attend_cached(self, q, k, v, cu_seqlens, cache, layer):
        """Append this step's k/v of every row to its cache row, then attend each row's new
        queries to all of that row's cached keys (bottom-right causal)."""
        kc, vc = cache.k[layer], cache.v[layer]
        starts = cache.lengths.tolist()
        bounds = cu_seqlens.tolist()
        if len(bounds) - 1 == q.shape[0]:   # decode: one new token per row -> one indexed write
            rows = torch.arange(q.shape[0], device=kc.device)
            pos = cache.lengths.to(kc.device)
            kc[rows, pos] = k
            vc[rows, pos] = v
            bounds = None
        keys, vals, cu_k = [], [], [0]
        for b in range(len(starts)):
            n_new = 1 if bounds is None else bounds[b + 1] - bounds[b]
            s = starts[b]
            if bounds is not None:
                kc[b, s:s + n_new] = k[bounds[b]:bounds[b + 1]]
                vc[b, s:s + n_new] = v[bounds[b]:bounds[b + 1]]
            keys.append(kc[b, :s + n_new])
            vals.append(vc[b, :s + n_new])
            cu_k.append(cu_k[-1] + s + n_new)
        # one row: the cache slice is a view; several rows: packed into one buffer
        k_all = keys[0] if len(keys) == 1 else torch.cat(keys)
        v_all = vals[0] if len(vals) == 1 else torch.cat(vals)
        cu_k = torch.tensor(cu_k, dtype=torch.int32, device=q.device)
        max_q = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
        return varlen_attention(q, k_all, v_all, cu_seqlens, cu_k, max_q, int((cu_k[1:] - cu_k[:-1]).max()),
                                causal=True, scale=self.hd ** -0.5)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size, bias=False)

    def forward(self, x, cos, sin, cu_seqlens, max_seqlen, cache=None, layer=0):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cu_seqlens, max_seqlen, cache, layer)
        return x + self.mlp(self.post_attention_layernorm(x))


class LanguageModel(nn.Module):
    """Embeddings, decoder layers and the final norm (checkpoint prefix `model.`)."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.gradient_checkpointing = False

    def forward(self, x, position_ids, cu_seqlens, cache=None):
        """x (T, hidden) packed embeddings, position_ids (3, T), cu_seqlens (n+1,) -> (T, hidden)."""
        cos, sin = mrope_cos_sin(position_ids, self.cfg, x.dtype)
        max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
        for i, layer in enumerate(self.layers):
            if self.gradient_checkpointing and self.training and cache is None:
                x = torch.utils.checkpoint.checkpoint(layer, x, cos, sin, cu_seqlens, max_seqlen,
                                                      use_reentrant=False)
            else:
                x = layer(x, cos, sin, cu_seqlens, max_seqlen, cache, i)
        if cache is not None:
            cache.lengths += (cu_seqlens[1:] - cu_seqlens[:-1]).cpu()
        return self.norm(x)


# -----------------------------------------------------------------------------
# The full model

Output = namedtuple("Output", ["logits", "loss"])


def check_sampling(temperature, top_k, top_p, max_new_tokens, flags=False):
    """A clear ValueError for settings sample_next / stream_generate cannot use (`flags`: name
    them as the CLI's --flags)."""
    def bad(name, value, why):
        raise ValueError(f"{'--' + name.replace('_', '-') if flags else name}={value}: {why}")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        bad("max_new_tokens", max_new_tokens, "must be an integer >= 0")
    if not isinstance(temperature, (int, float)) or not 0 <= temperature < math.inf:
        bad("temperature", temperature, "must be a finite number >= 0 (0 = greedy)")
    if not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
        bad("top_p", top_p, "must be in (0, 1] (1 = off)")
    if not isinstance(top_k, int) or top_k < 0:
        bad("top_k", top_k, "must be an integer >= 0 (0 = off)")


def sample_next(logits, temperature=0.0, top_k=0, top_p=1.0, generator=None, return_logprobs=False):
    """Pick the next token of each row from fp32 logits (rows, V): greedy when temperature == 0,
    else temperature -> top-k -> top-p (nucleus) -> multinomial. Log-probabilities are those of the
    distribution actually sampled from (after temperature and filtering)."""
    if temperature <= 0:
        tokens = logits.argmax(-1)
        logprobs = logits.log_softmax(-1).gather(-1, tokens[:, None])[:, 0] if return_logprobs else None
        return tokens, logprobs
    logits = logits / temperature
    if top_k and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= top_p         # keep the smallest set reaching top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    logp = logits.log_softmax(-1)
    tokens = torch.multinomial(logp.exp(), 1, generator=generator)[:, 0]
    return tokens, (logp.gather(-1, tokens[:, None])[:, 0] if return_logprobs else None)


class MiMoVL(nn.Module):
    def __init__(self, cfg: MiMoVLConfig):
        super().__init__()
        self.cfg = cfg.validate()
        self.visual = VisionTransformer(cfg.vision)
        self.model = LanguageModel(cfg.text)
        self.lm_head = nn.Linear(cfg.text.hidden_size, cfg.text.vocab_size, bias=False)
        if cfg.text.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module, std=0.02):
        """Initialisation for from-scratch training (as the reference: normal(0, 0.02), zero
        biases, unit norms). Skipped on the meta device (checkpoint loading)."""
        if isinstance(module, (nn.Linear, nn.Conv3d, nn.Embedding)):
            if module.weight.device.type == "meta":
                return
            nn.init.normal_(module.weight, std=std)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)

    @property
    def device(self):
        return self.model.embed_tokens.weight.device

    @property
    def dtype(self):
        return self.model.embed_tokens.weight.dtype

    # --- inputs -> packed embeddings and positions -----------------------------------------

    def embed(self, input_ids, attention_mask=None, pixel_values=None, image_grid_thw=None,
              pixel_values_videos=None, video_grid_thw=None, second_per_grid_ts=None, cu_seqlens=None):
        """Turn (B, L) inputs into packed embeddings (T, D), 3-D positions (3, T), cu_seqlens and
        per-sequence rope_deltas. Padding tokens (attention_mask == 0) are dropped; with an explicit
        `cu_seqlens` a (1, L) row holds several documents whose positions restart at 0."""
        cfg = self.cfg
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be (batch, length), got shape {tuple(input_ids.shape)}")
        B, L = input_ids.shape
        if cu_seqlens is not None:
            if B != 1:
                raise ValueError("packed rows (cu_seqlens) need input_ids of shape (1, length)")
            cu = torch.as_tensor(cu_seqlens).long().cpu()
            if cu[0] != 0 or cu[-1] != L or (cu[1:] < cu[:-1]).any():
                raise ValueError(f"cu_seqlens must rise from 0 to {L}, got {cu.tolist()}")
            keep = torch.ones(L, dtype=torch.bool, device=input_ids.device)
            segments = list(zip(cu[:-1].tolist(), cu[1:].tolist()))
            flat = input_ids[0]
        else:
            if attention_mask is None:
                attention_mask = torch.ones_like(input_ids)
            mask = attention_mask.bool()
            lengths = mask.sum(1).tolist()
            segments = []
            for b in range(B):
                idx = mask[b].nonzero().flatten()
                if len(idx) and int(idx[-1] - idx[0]) + 1 != len(idx):
                    raise ValueError(f"attention_mask row {b} is not one contiguous run of ones "
                                     "(use left or right padding only)")
            keep = mask.flatten()
            flat = input_ids.flatten()
            a = 0
            for b in range(B):
                segments.append((a, a + lengths[b]))
                a += lengths[b]
            flat = flat[keep]

        image_grid = None if image_grid_thw is None else torch.as_tensor(image_grid_thw).cpu()
        video_grid = None if video_grid_thw is None else torch.as_tensor(video_grid_thw).cpu()
        spg = None if second_per_grid_ts is None else torch.as_tensor(second_per_grid_ts).cpu()

        x = self.model.embed_tokens(flat)                                     # (T, D)
        for name, pix, grid, tok in (("image", pixel_values, image_grid, cfg.image_token_id),
                                     ("video", pixel_values_videos, video_grid, cfg.video_token_id)):
            sel = flat == tok
            n_tok = int(sel.sum())
            if pix is None:
                if n_tok:
                    raise ValueError(f"input_ids contain {n_tok} {name} placeholder tokens (id {tok}) "
                                     f"but no {name} pixels were given")
                continue
            if grid is None:
                raise ValueError(f"{name} pixels given without {name}_grid_thw")
            feats = self.visual(pix.to(self.dtype), grid)                     # (n_tok, D)
            if feats.shape[0] != n_tok:
                raise ValueError(f"{name} features and {name} placeholder tokens do not match: the "
                                 f"{name}s give {feats.shape[0]} tokens (grid {grid.tolist()}), input_ids "
                                 f"hold {n_tok}; expand each placeholder to t*h*w/4 tokens")
            x = x.masked_scatter(sel.unsqueeze(-1), feats.to(x.dtype))

        # 3-D positions per sequence; images/videos are consumed in order across sequences
        positions, deltas = [], []
        n_img = n_vid = 0
        flat_cpu = flat.cpu()
        for a, e in segments:
            pos, delta, ni, nv = get_rope_index(
                flat_cpu[a:e], cfg,
                None if image_grid is None else image_grid[n_img:],
                None if video_grid is None else video_grid[n_vid:],
                None if spg is None else spg[n_vid:])
            n_img, n_vid = n_img + ni, n_vid + nv
            positions.append(pos)
            deltas.append(delta)
        position_ids = torch.cat(positions, dim=1).to(x.device)
        cu_seqlens = torch.tensor([0] + [e for _, e in segments], dtype=torch.int32, device=x.device)
        if any(e == a for a, e in segments):
            raise ValueError("a sequence has no tokens (an attention_mask row of zeros or an empty "
                             "document in cu_seqlens)")
        return x, position_ids, cu_seqlens, deltas, keep

    # --- forward -----------------------------------------------------------------------------

    def forward(self, input_ids, attention_mask=None, pixel_values=None, image_grid_thw=None,
                pixel_values_videos=None, video_grid_thw=None, second_per_grid_ts=None,
                labels=None, cu_seqlens=None, return_logits=None):
        """Logits (B, L, V) for every input position (zeros at padding), or, when `labels` are given,
        the mean next-token cross-entropy over labels != -100 (HF convention: labels aligned with
        input_ids, shifted here) computed in chunks without the full logits."""
        x, position_ids, cu, _, keep = self.embed(input_ids, attention_mask, pixel_values, image_grid_thw,
                                                  pixel_values_videos, video_grid_thw,
                                                  second_per_grid_ts, cu_seqlens)
        h = self.model(x, position_ids, cu)                                   # (T, D)
        if return_logits is None:
            return_logits = labels is None
        loss = None
        if labels is not None:
            # target of packed token i is the label of the next position in the same row
            shifted = F.pad(labels[:, 1:], (0, 1), value=-100).flatten()[keep.to(labels.device)]
            valid = shifted != -100
            n = int(valid.sum())
            # chunked: the [tokens, vocab] logits never exist at once (kernels.linear_cross_entropy)
            loss = linear_cross_entropy(h[valid], self.lm_head.weight, shifted[valid], reduction="sum") / max(n, 1)
        logits = None
        if return_logits:
            B, L = input_ids.shape
            logits = h.new_zeros(B * L, self.cfg.text.vocab_size, dtype=torch.float)
            logits[keep] = self.lm_head(h).float()
            logits = logits.view(B, L, -1)
        return Output(logits, loss)

    def token_logprobs(self, input_ids, labels, with_entropy=False, chunk=None, **inputs):
        """log pi(labels[b, t] | tokens < t) at every position t whose label is not -100 (labels
        aligned with input_ids, as for the loss), as a (B, L) tensor with zeros elsewhere: the
        per-token log-probabilities that RL needs, from the packed training forward, in chunks of
        `chunk` labelled tokens (default: ~1 GiB of fp32 logits each). Position 0 has no
        prediction and must be -100. With with_entropy=True also the entropy of each of those
        predictive distributions (no gradient).
        Under autograd each chunk runs under activation checkpointing: backward keeps only the
        chunk's hidden states and recomputes its logits, so an 8K-token response at vocabulary
        151,680 does not hold ~5 GB of fp32 log-softmax until backward."""
        if chunk is not None and chunk < 1:
            raise ValueError(f"token_logprobs: chunk={chunk} must be a positive number of tokens (or None)")
        x, position_ids, cu, _, keep = self.embed(input_ids, inputs.pop("attention_mask", None), **inputs)
        h = self.model(x, position_ids, cu)                                   # (T, D)
        B, L = input_ids.shape
        shifted = F.pad(labels[:, 1:], (0, 1), value=-100).flatten()[keep.to(labels.device)]
        valid = (shifted != -100).nonzero().flatten()
        # as the cross-entropy's chunks: ~1 GiB of fp32 logits, 1024 rows at vocabulary 151,680. A
        # chunk's forward or recomputation briefly holds a few such tensors (the head's output,
        # its fp32 copy, the log-softmax, in backward its gradient)
        chunk = chunk or default_chunk_rows(max(len(valid), 1), self.cfg.text.vocab_size, 4)
        grad = torch.is_grad_enabled() and any(p.requires_grad for p in (h, *self.lm_head.parameters()))
        lp = h.new_zeros(len(valid), dtype=torch.float)
        ent = h.new_zeros(len(valid), dtype=torch.float) if with_entropy else None
        for a in range(0, len(valid), chunk):
            idx = valid[a:a + chunk]
            args = (h[idx], shifted[idx], with_entropy)
            if grad:   # no-grad callers (rollouts, evaluation) skip the checkpoint's bookkeeping
                lp_c, ent_c = torch.utils.checkpoint.checkpoint(self._chunk_logprobs, *args, use_reentrant=False)
            else:
                lp_c, ent_c = self._chunk_logprobs(*args)
            lp[a:a + chunk] = lp_c
            if with_entropy:
                ent[a:a + chunk] = ent_c
        out = h.new_zeros(B * L, dtype=torch.float)
        positions = keep.nonzero().flatten()[valid] + 1                       # slot of the target token
        out = out.index_put((positions,), lp).view(B, L)
        if not with_entropy:
            return out
        return out, h.new_zeros(B * L, dtype=torch.float).index_put((positions,), ent).view(B, L)

    def _chunk_logprobs(self, h, targets, with_entropy):
        """Log-probs of `targets` (C,) under the head's distributions at hidden states h (C, D),
        and their entropies when asked (None otherwise)."""
        logp = self.lm_head(h).float().log_softmax(-1)                         # (C, V)
        ent = None
        if with_entropy:
            with torch.no_grad():
                ent = -(logp.exp() * logp).sum(-1)
        return logp.gather(-1, targets[:, None])[:, 0], ent

    def prepare_for_cpu_inference(self):
        """Inference on a CPU: fuse q/k/v and gate/up into single matmuls and, in bf16, pack every
        linear weight for oneDNN once (kernels.pack_linear_weights_for_cpu). Measured with
        `python bench.py --cpu`. The model is inference-only afterwards. Returns the number of
        packed linears (0 where the CPU / PyTorch build cannot pack)."""
        from kernels import pack_linear_weights_for_cpu
        for m in list(self.modules()):
            if isinstance(m, (Attention, MLP)) and not hasattr(m, "qkv_proj") and not hasattr(m, "gate_up_proj"):
                m.fuse_for_inference()
        self.inference_only = True
        return pack_linear_weights_for_cpu(self) if self.dtype == torch.bfloat16 else 0

    # --- generation ----------------------------------------------------------------------

    @torch.inference_mode()
    def stream_generate(self, input_ids, attention_mask=None, pixel_values=None, image_grid_thw=None,
                        pixel_values_videos=None, video_grid_thw=None, second_per_grid_ts=None,
                        max_new_tokens=32, temperature=0.0, top_k=0, top_p=1.0, seed=None,
                        stop_token_ids=None, n=1, return_logprobs=False):
        """Prefill once, then decode token by token with a preallocated KV cache.
        Yields, per step, (tokens [B*n], logprobs [B*n] or None, finished [B*n] bool). Row b*n+j is
        sample j of prompt b; all n samples share the prompt's prefill. A finished row keeps
        yielding its stop token."""
        check_sampling(temperature, top_k, top_p, max_new_tokens)
        if max_new_tokens == 0:
            return
        B = input_ids.shape[0]
        device = self.device
        if stop_token_ids is None:
            stop_token_ids = [] if self.cfg.eos_token_id is None else [self.cfg.eos_token_id]
        stop = torch.tensor(sorted(set(stop_token_ids)), dtype=torch.long, device=device)
        gen = None
        if temperature > 0:
            gen = torch.Generator(device=device)
            gen.manual_seed(seed if seed is not None else torch.seed())

        x, pos, cu, deltas, _ = self.embed(input_ids.to(device), None if attention_mask is None else
                                           attention_mask.to(device), pixel_values, image_grid_thw,
                                           pixel_values_videos, video_grid_thw, second_per_grid_ts)
        lengths = (cu[1:] - cu[:-1]).cpu()
        max_len = int(lengths.max()) + max_new_tokens
        if max_len > self.cfg.text.max_position_embeddings:
            raise ValueError(f"prompt of {int(lengths.max())} tokens + max_new_tokens={max_new_tokens} "
                             f"exceeds the context of {self.cfg.text.max_position_embeddings} tokens; "
                             "shorten the prompt (fewer/smaller images) or lower max_new_tokens")
        t = self.cfg.text
        cache = KVCache(t.num_hidden_layers, B, max_len, t.num_key_value_heads, t.head_dim, x.dtype, device)
        h = self.model(x, pos, cu, cache)                                       # (T, D)
        last = self.lm_head(h[cu[1:].long() - 1]).float()                       # (B, V)
        if n > 1:
            rows = torch.arange(B, device=device).repeat_interleave(n)
            cache.reorder(rows)
            last = last[rows]
        deltas = torch.tensor(deltas, dtype=torch.long).repeat_interleave(n)
        finished = torch.zeros(B * n, dtype=torch.bool, device=device)
        step_cu = torch.arange(B * n + 1, dtype=torch.int32, device=device)
        for step in range(max_new_tokens):
            tokens, logprobs = sample_next(last, temperature, top_k, top_p, gen, return_logprobs)
            if len(stop):
                tokens = torch.where(finished, stop[0], tokens)
                finished = finished | torch.isin(tokens, stop)
            yield tokens, logprobs, finished
            if step == max_new_tokens - 1 or bool(finished.all()):
                return
            p = (cache.lengths + deltas).to(device)                             # M-RoPE id of the new token
            h = self.model(self.model.embed_tokens(tokens), p.expand(3, -1), step_cu, cache)
            last = self.lm_head(h).float()

    def generate(self, input_ids, max_new_tokens=32, temperature=0.0, return_logprobs=False, **kw):
        """The new token ids (B*n, steps); after a stop token a row repeats that stop token.
        With return_logprobs=True also the log-probability of each chosen token (B*n, steps).
        max_new_tokens=0 gives (B*n, 0)."""
        toks, lps = [], []
        for tokens, logprobs, _ in self.stream_generate(input_ids, max_new_tokens=max_new_tokens,
                                                        temperature=temperature,
                                                        return_logprobs=return_logprobs, **kw):
            toks.append(tokens)
            lps.append(logprobs)
        if not toks:
            rows = input_ids.shape[0] * kw.get("n", 1)
            out = torch.empty(rows, 0, dtype=torch.long, device=self.device)
            return (out, torch.empty(rows, 0, device=self.device)) if return_logprobs else out
        out = torch.stack(toks, dim=1)
        return (out, torch.stack(lps, dim=1)) if return_logprobs else out

    # --- checkpoints ---------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, path, dtype=None, device=None, progress=True):
        """Load a Qwen2.5-VL-format folder (config.json + model.safetensors or shards with
        model.safetensors.index.json). Strict: all missing / unexpected / mis-shaped keys are
        reported together. Parameters are created on the meta device and filled shard by shard,
        so peak memory stays near one copy of the model plus one shard."""
        return load_checkpoint(cls, path, dtype=dtype, device=device, progress=progress)

    @classmethod
    def from_towers(cls, vit_dir, lm_dir, tokenizer_dir=None, projector_from_vit=False, dtype=None, device=None,
                    progress=True):
        """MiMo-VL's start point (MiMo-VL report §2.1): the ViT from one checkpoint, the LM from
        another, a fresh projector.

        vit_dir: a Qwen2.5-VL-format folder (transformers 4.57 keys `visual.*` / `model.*` or 5.x
            keys `model.visual.*` / `model.language_model.*`); its `visual.*` tensors become the
            ViT, its LM tensors are skipped.
        lm_dir: a text checkpoint (Qwen2ForCausalLM / MiMoForCausalLM: `model.embed_tokens`,
            `model.layers.N.*`, `model.norm`, `lm_head` or tied) or a Qwen2.5-VL folder, whose LM
            part is taken. MiMo-7B-Base's `model.mtp_layers.*` (multi-token prediction) are dropped
            and counted on stderr; any other missing, unexpected, mis-shaped or non-float key in
            either folder is an error listing them all.
        tokenizer_dir: the folder with the LM's tokenizer.json (default lm_dir), checked with
            check_tokenizer: it must fit the embedding and have the four vision tokens at the
            config's ids (a text tokenizer without them is an error saying what to add).
        projector_from_vit: take the projector (`visual.merger.*`) from vit_dir too; only possible
            when its out_hidden_size equals the LM's hidden_size. The paper's pair does not fit:
            Qwen2.5-VL-7B's merger outputs 3584 (Qwen2-7B's width), MiMo-7B's hidden size is 4096,
            so its last Linear could not be reused; MiMo-VL starts with a fresh projector, the
            default here (init_projector: drawn from torch's global RNG, seed it first).
        dtype: default the LM's config.json torch_dtype, else fp32; device: default cpu.

        Everything is checked first, from the config.json files, the tokenizer and the safetensors
        headers (towers_plan: how the config is combined); then the model is built on the meta
        device and filled tensor by tensor, shard by shard, so memory peaks near one model plus
        one tensor. Returns the model in eval mode."""
        return load_towers(cls, vit_dir, lm_dir, tokenizer_dir=tokenizer_dir, projector_from_vit=projector_from_vit,
                           dtype=dtype, device=device, progress=progress)

    def init_projector(self):
        """A fresh projector (`visual.merger`), initialised as a from-scratch MiMoVL is (_init_weights:
        normal(0, 0.02) weights, zero biases; unit RMSNorm weight), drawn in fp32 on the CPU from
        torch's global RNG, then moved to the model's device and dtype, so the same seed gives the
        same projector everywhere. Also fills a merger left on the meta device (from_towers); on a
        model still wholly on the meta device (before FSDP2 sharding) the projector becomes a real
        fp32 CPU module and the rest stays on meta."""
        merger = self.visual.merger
        device, dtype = self.device, self.dtype
        if device.type == "meta":
            device = torch.device("cpu")
        merger.to_empty(device="cpu").float()
        with torch.no_grad():
            merger.apply(self._init_weights)
            merger.ln_q.weight.fill_(1.0)
        merger.to(device=device, dtype=dtype)

    def save_pretrained(self, path, max_shard_bytes=5 * 1024 ** 3):
        save_checkpoint(self, path, max_shard_bytes=max_shard_bytes)


# -----------------------------------------------------------------------------
# Checkpoint I/O (keys as transformers 4.57 `modeling_qwen2_5_vl.py` saves them; 5.x renames them,
# see its `conversion_mapping.py`)

# Keys that may appear in a checkpoint and carry nothing this model uses.
IGNORABLE_KEY_PREFIXES = (
    "model.mtp_layers.",  # MiMo-7B's multi-token-prediction layers; Qwen2_5_VL has no MTP
)
IGNORABLE_KEY_SUFFIXES = (
    ".rotary_emb.inv_freq",  # non-persistent rotary buffers some exporters still write
)


def canonical_key(key):
    """Map a checkpoint key to our (legacy) naming. transformers 5 saves `model.language_model.*`
    and `model.visual.*` (its `conversion_mapping.py`); the legacy names are `model.*` and `visual.*`."""
    if key.startswith("model.language_model."):
        return "model." + key[len("model.language_model."):]
    if key.startswith("model.visual."):
        return key[len("model."):]
    return key


def _dtype_from_name(name):
    table = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16,
             "fp16": torch.float16, "float32": torch.float32, "fp32": torch.float32}
    if isinstance(name, torch.dtype) or name is None:
        return name
    if name not in table:
        raise ValueError(f"unknown dtype {name!r}; use one of {', '.join(table)}")
    return table[name]


FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")   # safetensors header names


def checkpoint_shards(path):
    """The safetensors files of a checkpoint folder: model.safetensors, or the shards its
    model.safetensors.index.json names. Shard names must stay inside the folder (no absolute
    path, no ..): an index must not make the loader open files elsewhere. Subfolders and symlinks
    (the Hugging Face cache links into its blobs folder) are fine."""
    index_path = os.path.join(path, "model.safetensors.index.json")
    if not os.path.isfile(index_path):
        if os.path.isfile(os.path.join(path, "model.safetensors")):
            return ["model.safetensors"]
        raise FileNotFoundError(f"no model.safetensors or model.safetensors.index.json in {path}")
    weight_map = read_json_file(index_path).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map or \
            not all(isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
        raise ValueError(f"{index_path}: needs a non-empty \"weight_map\" object of tensor name -> shard file name")
    shards = sorted(set(weight_map.values()))
    for shard in shards:
        parts = shard.replace("\\", "/").split("/")
        if os.path.isabs(shard) or ".." in parts or not shard.endswith(".safetensors"):
            raise ValueError(f"{index_path}: shard {shard!r} must be a .safetensors file inside the model "
                             "folder (no absolute path, no '..')")
    for shard in shards:
        if not os.path.isfile(os.path.join(path, shard)):
            raise FileNotFoundError(f"shard {os.path.join(path, shard)} listed in {index_path} is missing")
    return shards


def _read_config(path, role="model folder"):
    """(config.json as a dict, its path) of checkpoint folder `path`, with errors that say what to do."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{role} {path!r} does not exist; download a Qwen2.5-VL-format "
                                "checkpoint (e.g. XiaomiMiMo/MiMo-VL-7B-RL) into a folder and pass that folder")
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"{cfg_path} is missing: the folder is not a Hugging Face checkpoint")
    return read_json_file(cfg_path), cfg_path


def _file_dtype(raw, cfg_path):
    try:
        return _dtype_from_name(raw.get("torch_dtype") or raw.get("dtype"))
    except ValueError as e:
        raise ValueError(f"{cfg_path}: torch_dtype: {e}") from None


def load_checkpoint(cls, path, dtype=None, device=None, progress=True):
    raw, cfg_path = _read_config(path)
    path = os.fspath(path)
    cfg = MiMoVLConfig.from_hf_dict(raw, source=cfg_path)
    file_dtype = _file_dtype(raw, cfg_path)     # checked even when `dtype` overrides it
    dtype = _dtype_from_name(dtype) or file_dtype or torch.float32
    device = torch.device(device or "cpu")
    checkpoint_shards(path)          # a folder without weights fails before the model is built
    with torch.device("meta"):
        model = cls(cfg)
    tied = cfg.text.tie_word_embeddings
    expected = set(model.state_dict()) - ({"lm_head.weight"} if tied else set())

    def route(key):
        if key.startswith(IGNORABLE_KEY_PREFIXES) or key.endswith(IGNORABLE_KEY_SUFFIXES):
            return "ignorable"
        return "tied: the embedding is the head" if key == "lm_head.weight" and tied else "load"
    sources, _, problems = plan_folder(path, route, expected, model)
    if problems:
        raise ValueError("\n".join([f"checkpoint {path} does not match the model built from its config.json:",
                                    *problems]))
    load_sources(model, sources, dtype, device, progress)
    return _finish_loading(model)


def _unreadable(file, error):
    return ValueError(f"{file} is not a readable safetensors file ({error}); it may be truncated or "
                      "corrupt: download it again")


def plan_folder(path, route, expected, model):
    """Where each parameter of `model` comes from in checkpoint folder `path`, read from the
    safetensors headers only (no tensor data). `route(key)` (key in our naming, canonical_key)
    says "load" for a tensor this folder must provide, or a reason to skip it; `expected` is the
    set of parameter names the folder must provide. Returns (sources {name: (file, raw key)},
    skipped {reason: [raw keys]}, problems): one line per kind of problem (missing, unexpected,
    mis-shaped, non-float keys), each listing its keys (at most 20)."""
    from safetensors import SafetensorError, safe_open

    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    sources, reported, skipped = {}, set(), {}
    unexpected, mis_shaped, wrong_dtype = [], [], []
    for shard in checkpoint_shards(path):
        file = os.path.join(path, shard)
        try:
            with safe_open(file, framework="pt", device="cpu") as f:
                for raw_key in f.keys():
                    key = canonical_key(raw_key)
                    why = route(key)
                    if why != "load":
                        skipped.setdefault(why, []).append(raw_key)
                        continue
                    if key not in expected:
                        unexpected.append(raw_key)
                        continue
                    header = f.get_slice(raw_key)
                    shape = tuple(header.get_shape())
                    if shape != shapes[key]:
                        mis_shaped.append(f"{raw_key}: checkpoint {shape} vs model {shapes[key]}")
                        reported.add(key)
                    elif header.get_dtype() not in FLOAT_DTYPES:   # every parameter is a float tensor
                        wrong_dtype.append(f"{raw_key}: {header.get_dtype()}")
                        reported.add(key)
                    else:
                        sources[key] = (file, raw_key)
        except SafetensorError as e:
            raise _unreadable(file, e) from None
    missing = sorted(expected - set(sources) - reported)
    problems = [f"  {len(items)} {title} key(s): " + ", ".join(items[:20]) + (" ..." if len(items) > 20 else "")
                for title, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", mis_shaped),
                                     ("non-float (parameters are float tensors)", wrong_dtype)) if items]
    return sources, skipped, problems


def load_sources(model, sources, dtype, device, progress=True):
    """Fill the parameters of `model` (built on the meta device) from `sources` ({name: (file,
    raw key)}, plan_folder), file by file and tensor by tensor: memory holds the model plus the
    one tensor being converted, never a whole shard."""
    from safetensors import SafetensorError, safe_open
    from tqdm import tqdm

    by_file = {}
    for name, (file, raw_key) in sources.items():
        by_file.setdefault(file, []).append((name, raw_key))
    for file, items in tqdm(by_file.items(), desc="loading shards", disable=not progress or len(by_file) < 2):
        try:
            with safe_open(file, framework="pt", device="cpu") as f:
                for name, raw_key in items:
                    _set_param(model, name, f.get_tensor(raw_key).to(device=device, dtype=dtype))
        except SafetensorError as e:
            raise _unreadable(file, e) from None


def _finish_loading(model):
    """Tie the head to the embedding where the config says so; every parameter must be filled."""
    if model.cfg.text.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    leftover = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    assert not leftover, f"internal error: parameters left on meta: {leftover}"
    return model.eval()


def _set_param(model, key, tensor):
    module_name, _, name = key.rpartition(".")
    module = model.get_submodule(module_name)
    module._parameters[name] = nn.Parameter(tensor, requires_grad=module._parameters[name].requires_grad)


# -----------------------------------------------------------------------------
# The paper's start point: Qwen2.5-ViT from one checkpoint, MiMo-7B-Base from another, a fresh
# projector (MiMo-VL report §2.1)

# transformers' Qwen2Config defaults (`configuration_qwen2.py`): what transformers uses for a key a
# text-only config.json leaves out, so we read such a file as it does.
QWEN2_TEXT_DEFAULTS = dict(vocab_size=151936, hidden_size=4096, intermediate_size=22016, num_hidden_layers=32,
                           num_attention_heads=32, hidden_act="silu", max_position_embeddings=32768,
                           rms_norm_eps=1e-6, tie_word_embeddings=False, rope_theta=10000.0)

# The config fields naming the vision tokens, and the tokens (Qwen2.5-VL's tokenizer) they must be.
VISION_TOKENS = (("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>"),
                 ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"))


def _qwen2_mrope_section(head_dim, vit_mrope):
    """M-RoPE's (t, h, w) split for an LM trained with 1-D RoPE. Text-only tokens have equal t, h
    and w ids, so any split leaves text exactly as the LM was trained; images need one. Take the
    ViT checkpoint's when it fits head_dim, else Qwen2.5-VL's proportions ([16, 24, 24] of 64:
    3/8 each for height and width, the rest for time)."""
    half = head_dim // 2
    if sum(vit_mrope) == half:
        return list(vit_mrope)
    hw = 3 * half // 8
    return [half - 2 * hw, hw, hw]


def _text_config(raw, cfg_path, vit_mrope):
    """TextConfig of a text-only Qwen2ForCausalLM / MiMoForCausalLM config.json (fields at top
    level, transformers' Qwen2Config defaults for the ones left out)."""
    check_json_fields(raw, cfg_path, {**_field_kinds(TextConfig), "rope_scaling": "object",
                                      "use_sliding_window": "boolean"})
    rope = raw.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) not in ("default", "mrope"):
        raise ValueError(f"{cfg_path}: rope_scaling {rope} is not supported (only plain RoPE); "
                         "start from a checkpoint trained without rope scaling")
    if raw.get("use_sliding_window"):
        raise ValueError(f"{cfg_path}: use_sliding_window=true is not supported (full attention only)")
    kw = {**QWEN2_TEXT_DEFAULTS, **{f.name: raw[f.name] for f in fields(TextConfig)
                                    if f.name != "mrope_section" and raw.get(f.name) is not None}}
    kw.setdefault("num_key_value_heads", kw["num_attention_heads"])   # Qwen2Config: None means MHA
    heads = kw["num_attention_heads"]
    head_dim = kw["hidden_size"] // heads if isinstance(heads, int) and heads > 0 else 0
    if raw.get("head_dim") not in (None, head_dim):
        raise ValueError(f"{cfg_path}: head_dim={raw['head_dim']} is not hidden_size / num_attention_heads="
                         f"{head_dim}; such a model is not a Qwen2 decoder and is not supported")
    return TextConfig(**kw, mrope_section=_qwen2_mrope_section(head_dim, vit_mrope))


def _towers_config(vit_dir, lm_dir):
    """(combined MiMoVLConfig, the ViT checkpoint's own config, whether lm_dir is a Qwen2.5-VL
    folder, the LM's file dtype); see towers_plan."""
    vit_raw, vit_path = _read_config(vit_dir, "ViT folder")
    vit_cfg = MiMoVLConfig.from_hf_dict(vit_raw, source=vit_path)
    lm_raw, lm_path = _read_config(lm_dir, "LM folder")
    if not isinstance(lm_raw, dict):
        raise ValueError(f"{lm_path} must hold a JSON object, not a {type(lm_raw).__name__}")
    lm_is_vl = "vision_config" in lm_raw
    if lm_is_vl:                      # a Qwen2.5-VL folder: its LM part and its vision-token ids
        lm_cfg = MiMoVLConfig.from_hf_dict(lm_raw, source=lm_path)
        text, ids_from = lm_cfg.text, lm_cfg
        ends = {k: getattr(lm_cfg, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    else:                             # a text checkpoint: vision-token ids as the ViT's config names them
        text, ids_from = _text_config(lm_raw, lm_path, vit_cfg.text.mrope_section), vit_cfg
        check_json_fields(lm_raw, lm_path, {"bos_token_id": "integer >= 0", "pad_token_id": "integer >= 0",
                                            "eos_token_id": "token id or list of token ids"})
        eos = lm_raw.get("eos_token_id")
        ends = {"bos_token_id": lm_raw.get("bos_token_id"), "pad_token_id": lm_raw.get("pad_token_id"),
                "eos_token_id": eos[0] if isinstance(eos, list) and eos else eos}
    ends = {k: getattr(vit_cfg, k) if v is None else v for k, v in ends.items()}
    vision = VisionConfig(**{**asdict(vit_cfg.vision), "out_hidden_size": text.hidden_size})
    cfg = MiMoVLConfig(text=text, vision=vision, **{k: getattr(ids_from, k) for k, _ in VISION_TOKENS}, **ends)
    try:
        cfg.validate()
    except ValueError as e:
        raise ValueError(f"{lm_path} + {vit_path}: {e}") from None
    return cfg, vit_cfg, lm_is_vl, _file_dtype(lm_raw, lm_path)


def check_tokenizer(cfg, folder):
    """The tokenizer in `folder` (tokenizer.json) must fit `cfg`: the embedding has a row for every
    token id, <|vision_start|>, <|vision_end|>, <|image_pad|>, <|video_pad|> exist with exactly
    the config's ids (a wrong id would put image features on other tokens), and so do the
    config's bos/eos/pad ids. Every problem is listed in one ValueError that says how to fix it."""
    from tokenizers import Tokenizer

    path = os.path.join(os.fspath(folder), "tokenizer.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is missing: the LM's tokenizer is needed to check the vocabulary "
                                "and the vision-token ids; copy it there or pass tokenizer_dir")
    try:
        tok = Tokenizer.from_file(path)
    except Exception as e:  # the Rust library raises a bare Exception for every parse error
        raise ValueError(f"{path} is not a readable tokenizer ({e})") from None
    rows = cfg.text.vocab_size
    top = max(tok.get_vocab(with_added_tokens=True).values(), default=-1)
    problems = []
    if top >= rows:
        problems.append(f"it has token ids up to {top}, but the LM's embedding has {rows} rows: "
                        "use the tokenizer the LM was trained with")
    for name, token in VISION_TOKENS:
        want, have = getattr(cfg, name), tok.token_to_id(token)
        if have is None:
            problems.append(f"it has no {token}, which the config uses as {name}={want}: add it to tokenizer.json's "
                            f"\"added_tokens\" as {{\"id\": {want}, \"content\": \"{token}\", \"special\": true}} "
                            f"(and to tokenizer_config.json's \"added_tokens_decoder\"); id {want} is "
                            + ("an embedding row the LM has (it learns its meaning in training)" if want < rows else
                               f"outside the {rows} embedding rows: choose an id below {rows} in both files"))
        elif have != want:
            problems.append(f"{token} is id {have} there, but the config uses {name}={want}: set {name} to "
                            f"{have} in the config.json the ids come from, or use the matching tokenizer")
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        token_id = getattr(cfg, name)
        if token_id is not None and tok.id_to_token(token_id) is None:
            problems.append(f"it has no token {token_id}, the config's {name}: use the tokenizer the LM was "
                            f"trained with, or fix {name} in the LM's config.json")
    if problems:
        raise ValueError(f"tokenizer {path} does not fit the model:\n  " + "\n  ".join(problems))


TowersPlan = namedtuple("TowersPlan", ["config", "sources", "dropped", "dtype"])


def towers_plan(vit_dir, lm_dir, tokenizer_dir=None, projector_from_vit=False):
    """Everything MiMoVL.from_towers checks, before one weight is read (config.json files, the
    tokenizer, safetensors headers): TowersPlan(config, sources, dropped, dtype).

    config: the combined MiMoVLConfig. vision_config from the ViT folder; the text fields from
        the LM folder (top level in a Qwen2 / MiMo text config.json, read with transformers'
        Qwen2Config defaults; or a Qwen2.5-VL config's text part); the projector's
        out_hidden_size = the LM's hidden_size; the vision-token ids from the LM folder when it is
        a Qwen2.5-VL folder, else from the ViT folder; bos/eos/pad from the LM folder (else the
        ViT folder's).
    sources: {parameter name: (safetensors file, key)} for every parameter but a fresh
        projector's (and lm_head when tied), so a sharded trainer can read just its own rows.
    dropped: the LM folder's `model.mtp_layers.*` keys, left out.
    dtype: the LM's config.json torch_dtype (None when it has none)."""
    vit_dir, lm_dir = os.fspath(vit_dir), os.fspath(lm_dir)
    cfg, vit_cfg, lm_is_vl, file_dtype = _towers_config(vit_dir, lm_dir)
    check_tokenizer(cfg, tokenizer_dir or lm_dir)
    if projector_from_vit and vit_cfg.vision.out_hidden_size != cfg.text.hidden_size:
        raise ValueError(f"projector_from_vit: the projector in {vit_dir} outputs vision_config.out_hidden_size="
                         f"{vit_cfg.vision.out_hidden_size}, but the LM in {lm_dir} has hidden_size="
                         f"{cfg.text.hidden_size}; start with a fresh projector (projector_from_vit=False), "
                         "as MiMo-VL does")
    for path in (vit_dir, lm_dir):
        checkpoint_shards(path)
    with torch.device("meta"):
        model = MiMoVL(cfg)                # shapes only
    names, tied, fresh = set(model.state_dict()), cfg.text.tie_word_embeddings, not projector_from_vit

    def vit_route(key):
        if key.endswith(IGNORABLE_KEY_SUFFIXES):
            return "ignorable"
        if key.startswith(("model.", "lm_head.")):
            return "the ViT folder's language model"
        return "fresh projector" if fresh and key.startswith("visual.merger.") else "load"

    def lm_route(key):
        if key.startswith("model.mtp_layers."):
            return "mtp"
        if key.endswith(IGNORABLE_KEY_SUFFIXES):
            return "ignorable"
        if lm_is_vl and key.startswith("visual."):
            return "the LM folder's vision tower"
        return "tied: the embedding is the head" if key == "lm_head.weight" and tied else "load"

    vit_keys = {k for k in names if k.startswith("visual.") and not (fresh and k.startswith("visual.merger."))}
    lm_keys = {k for k in names if not k.startswith("visual.")} - ({"lm_head.weight"} if tied else set())
    sources, errors = {}, []
    for what, path, route, keys in (("ViT", vit_dir, vit_route, vit_keys), ("LM", lm_dir, lm_route, lm_keys)):
        found, skipped, problems = plan_folder(path, route, keys, model)
        sources.update(found)
        if problems:
            errors += [f"{what} checkpoint {path}:", *problems]
    if errors:
        raise ValueError("\n".join(["the checkpoints do not match the model built from their config.json files:",
                                    *errors]))
    return TowersPlan(cfg, sources, skipped.get("mtp", []), file_dtype)


def load_towers(cls, vit_dir, lm_dir, tokenizer_dir=None, projector_from_vit=False, dtype=None, device=None,
                progress=True):
    """See MiMoVL.from_towers."""
    plan = towers_plan(vit_dir, lm_dir, tokenizer_dir, projector_from_vit)
    if plan.dropped and progress:
        print(f"{os.fspath(lm_dir)}: dropped {len(plan.dropped)} model.mtp_layers.* tensors (MiMo-7B's "
              "multi-token prediction; MiMo-VL does not use it)", file=sys.stderr)
    with torch.device("meta"):
        model = cls(plan.config)
    load_sources(model, plan.sources, _dtype_from_name(dtype) or plan.dtype or torch.float32,
                 torch.device(device or "cpu"), progress)
    if not projector_from_vit:
        model.init_projector()
    return _finish_loading(model)


def save_checkpoint(model, path, max_shard_bytes=5 * 1024 ** 3):
    """config.json + safetensors in the legacy naming, sharded above `max_shard_bytes` with an
    index. Every file is written to a temporary name and renamed, so a crash never leaves a
    half-written file under a real name."""
    from safetensors.torch import save_file

    if getattr(model, "inference_only", False):
        raise ValueError("this model was prepared for CPU inference (fused / oneDNN-packed weights) "
                         "and cannot be saved; save the model before prepare_for_cpu_inference()")
    os.makedirs(path, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if model.cfg.text.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    shards, current, size = [], {}, 0
    for k, v in state.items():
        n = v.numel() * v.element_size()
        if current and size + n > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[k] = v
        size += n
    shards.append(current)

    cfg = model.cfg.to_hf_dict()
    cfg["torch_dtype"] = str(model.dtype).replace("torch.", "")
    if len(shards) == 1:
        write_file_atomic(os.path.join(path, "model.safetensors"),
                          lambda tmp: save_file(shards[0], tmp, metadata={"format": "pt"}))
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            write_file_atomic(os.path.join(path, name), lambda tmp, s=shard: save_file(s, tmp, metadata={"format": "pt"}))
            weight_map.update({k: name for k in shard})
        total = sum(v.numel() * v.element_size() for v in state.values())
        write_json_atomic(os.path.join(path, "model.safetensors.index.json"),
                          {"metadata": {"total_size": total}, "weight_map": weight_map})
    write_json_atomic(os.path.join(path, "config.json"), cfg)

"""Builders for the parity tests: tiny random transformers-4.57 Qwen2.5-VL models saved to disk,
and synthetic token sequences with image/video placeholders."""

import torch

IMAGE, VIDEO, VSTART, VEND = 10, 11, 8, 9  # token ids used by the tiny reference configs


def hf_config(tie=False, **text_overrides):
    from transformers import Qwen2_5_VLConfig
    text = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6, rope_theta=10000.0,
                max_position_embeddings=4096, tie_word_embeddings=tie,
                rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]})
    text.update(text_overrides)
    vision = dict(depth=3, hidden_size=32, intermediate_size=48, num_heads=2, out_hidden_size=64,
                  fullatt_block_indexes=[1], window_size=112, tokens_per_second=2,
                  patch_size=14, spatial_merge_size=2, temporal_patch_size=2, in_channels=3)
    cfg = Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=IMAGE,
                           video_token_id=VIDEO, vision_start_token_id=VSTART, vision_end_token_id=VEND,
                           **text)
    cfg._attn_implementation = "sdpa"
    return cfg


def hf_model(seed=0, tie=False, **kw):
    from transformers import Qwen2_5_VLForConditionalGeneration
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(hf_config(tie=tie, **kw)).eval()
    # random init leaves norms at 1 and biases at 0: perturb every tensor so a swapped or
    # misnamed weight cannot hide
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def tokens(n, gen, lo=12, hi=256):
    return torch.randint(lo, hi, (n,), generator=gen).tolist()


def sequence(parts, gen, merge=2):
    """parts: list of int (n text tokens) | ("image", (t,h,w)) | ("video", (t,h,w)). Returns ids,
    image grids, video grids."""
    ids, images, videos = [], [], []
    for p in parts:
        if isinstance(p, int):
            ids += tokens(p, gen)
        else:
            kind, (t, h, w) = p
            n = t * h * w // (merge * merge)
            ids += [VSTART] + [IMAGE if kind == "image" else VIDEO] * n + [VEND]
            (images if kind == "image" else videos).append([t, h, w])
    return ids, images, videos


def pixels(grids, gen):
    if not grids:
        return None, None
    n = sum(t * h * w for t, h, w in grids)
    return torch.randn(n, 1176, generator=gen), torch.tensor(grids)

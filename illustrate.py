"""
illustrate.py — pictures of how MiMo-VL reads an image and a video, drawn from the functions the
model itself runs (each caption names them):

  patches.png        the image as the model sees it: resized by processor.smart_resize (through
                     preprocess_image), cut into 14-px patches, merged 2x2 into one LLM token each,
                     grouped into the 112-px windows of the ViT's windowed attention blocks
                     (vit.window_layout — the same call VisionTransformer.forward makes)
  video_patches.png  the same for a short video: pairs of frames form one temporal patch
  mrope.png          the three M-RoPE position ids (temporal, height, width) of every token of a
                     rendered prompt with the image and the video (mimovl.get_rope_index on the
                     ids of processor.Processor)

    pip install -e ".[report]"            # matplotlib
    python illustrate.py data/images/digits.png                          # -> runs/pictures/
    python illustrate.py data/images/digits.png --min-pixels 90000 --video data/clip --out docs
    python illustrate.py photo.jpg --model path/to/MiMo-VL-7B-RL --max-pixels 3211264

Without --model the prompt is tokenised by a small BPE trained on the synthetic world
(synthetic.train_tokenizer) with the tiny preset's vision settings, which are the official
model's (14-px patches, 2x2 merge, 112-px windows, 2 temporal ids per second). The layout follows
transformers' `modeling_qwen2_5_vl.py` (get_window_index, get_rope_index) and the Qwen2.5-VL
technical report.
"""

import argparse
import json
import os
import tempfile
import textwrap

import torch

import synthetic
from mimovl import MiMoVLConfig, get_rope_index
from processor import (PATCH_SIZE, TEMPORAL_PATCH_SIZE, Processor, fetch_video, load_image,
                       preprocess_image, preprocess_video, resize_image)
from report import pyplot
from vit import window_layout

HERE = os.path.dirname(os.path.abspath(__file__))


def caption(fig, text):
    """Text under the figure, wrapped to its width (about 15 characters per inch at 7 pt)."""
    fig.text(0.5, 0.005, textwrap.fill(text, int(fig.get_figwidth() * 15)), ha="center", va="bottom", fontsize=7)


# -----------------------------------------------------------------------------
# 1. Patches, merge cells and windows

def patch_layout(grid_thw, vision):
    """The window of every merged token of one image or video, read off vit.window_layout.

    grid_thw: (t, gh, gw) patches, as preprocess_image / preprocess_video return it; vision: a
    vit.VisionConfig. Returns {"merged": (t, lh, lw), "window": window side in merged tokens,
    "window_of": LongTensor (t, lh, lw)}: window_layout lists the merged tokens window by window
    (window_index) and where each window ends (cu_window_seqlens, in patches); inverting that
    gives each token's window number, numbered as the ViT does (frames in order, then raster)."""
    m = vision.spatial_merge_size
    window = vision.window_size // m // vision.patch_size
    t, gh, gw = (int(x) for x in grid_thw)
    window_index, cu_window = window_layout(torch.tensor([[t, gh, gw]]), m, window)
    ends = (cu_window[1:] // (m * m)).long()                   # window ends, in merged tokens
    window_of = torch.empty(len(window_index), dtype=torch.long)
    window_of[window_index] = torch.searchsorted(ends, torch.arange(len(window_index)), right=True)
    return {"merged": (t, gh // m, gw // m), "window": window, "window_of": window_of.view(t, gh // m, gw // m)}


def window_borders(window_of):
    """Unit segments ((x0, y0), (x1, y1)), in merged cells, between neighbouring merged tokens
    of one frame (lh, lw) that lie in different windows."""
    lh, lw = window_of.shape
    segments = []
    for r in range(lh):
        for c in range(lw):
            if c + 1 < lw and window_of[r, c] != window_of[r, c + 1]:
                segments.append(((c + 1, r), (c + 1, r + 1)))
            if r + 1 < lh and window_of[r, c] != window_of[r + 1, c]:
                segments.append(((c, r + 1), (c + 1, r + 1)))
    return segments


def draw_grid(ax, frame, window_of, cell):
    """One frame (PIL, at the model's size) with its patch lines (thin), 2x2 merge cells
    (medium), windows (tinted, numbered, bold borders)."""
    from matplotlib.collections import LineCollection
    w, h = frame.size
    ax.imshow(frame, extent=(0, w, h, 0))
    ax.imshow((window_of % 2 + 2 * ((window_of // 2) % 2)).numpy(), extent=(0, w, h, 0), cmap="Pastel1",
              alpha=0.3, interpolation="nearest", vmin=0, vmax=8)
    p = cell // 2
    ax.vlines(range(0, w + 1, p), 0, h, colors="white", linewidth=0.4, alpha=0.5)
    ax.hlines(range(0, h + 1, p), 0, w, colors="white", linewidth=0.4, alpha=0.5)
    ax.vlines(range(0, w + 1, cell), 0, h, colors="white", linewidth=1.0, alpha=0.9)
    ax.hlines(range(0, h + 1, cell), 0, w, colors="white", linewidth=1.0, alpha=0.9)
    segments = [[(x0 * cell, y0 * cell), (x1 * cell, y1 * cell)] for (x0, y0), (x1, y1) in window_borders(window_of)]
    segments += [[(0, 0), (w, 0)], [(w, 0), (w, h)], [(w, h), (0, h)], [(0, h), (0, 0)]]
    ax.add_collection(LineCollection(segments, colors="orange", linewidths=2.5, gid="windows"))
    for k in window_of.unique().tolist():
        rows, cols = (window_of == k).nonzero(as_tuple=True)
        ax.text((cols.float().mean().item() + 0.5) * cell, (rows.float().mean().item() + 0.5) * cell, str(k),
                color="black", fontsize=8, ha="center", va="center",
                bbox=dict(boxstyle="round,pad=0.15", fc="orange", ec="none", alpha=0.85))
    ax.set_xlim(0, w)
    ax.set_ylim(h, 0)
    ax.set_xticks(range(0, w + 1, 112))
    ax.set_yticks(range(0, h + 1, 112))
    ax.tick_params(labelsize=7)


def draw_image_patches(image, vision, min_pixels=None, max_pixels=None):
    """The image's picture -> (figure, patch_layout). Pixels and grid come from the processor's
    own preprocess_image (smart_resize, then patchify)."""
    plt = pyplot()
    _, grid = preprocess_image(image, min_pixels, max_pixels)
    resized = resize_image(image, min_pixels, max_pixels)
    layout = patch_layout(grid, vision)
    _, lh, lw = layout["merged"]
    cell = PATCH_SIZE * vision.spatial_merge_size
    fig, ax = plt.subplots(figsize=(6, 6 * resized.height / resized.width + 1.2))
    draw_grid(ax, resized, layout["window_of"][0], cell)
    n_windows = int(layout["window_of"].max()) + 1
    original = load_image(image).size
    ax.set_title(f"{original[0]}x{original[1]} -> {resized.width}x{resized.height} px: {grid[1]}x{grid[2]} patches of {PATCH_SIZE} px, "
                 f"{lh}x{lw} = {lh * lw} LLM tokens, {n_windows} windows", fontsize=9)
    caption(fig, "resize and grid: processor.preprocess_image (smart_resize, patchify). Thin lines: "
            f"{PATCH_SIZE}-px patches; white cells: 2x2 merge = 1 LLM token (vit.PatchMerger); orange: "
            f"{vision.window_size}-px attention windows, numbered in the ViT's order (vit.window_layout)")
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    return fig, layout


def draw_video_patches(video, vision, max_groups=6):
    """A video's picture -> (figure, patch_layout): one panel per temporal patch (its first frame),
    frames sampled and resized by processor.fetch_video, grid by preprocess_video."""
    plt = pyplot()
    frames, fps = fetch_video(video)
    _, grid, second_per_grid = preprocess_video(video)
    layout = patch_layout(grid, vision)
    t, lh, lw = layout["merged"]
    shown = min(t, max_groups)
    cell = PATCH_SIZE * vision.spatial_merge_size
    fig, axes = plt.subplots(1, shown, figsize=(3.2 * shown, 3.8), squeeze=False)
    from PIL import Image
    for k, ax in enumerate(axes[0]):
        frame = Image.fromarray(frames[k * TEMPORAL_PATCH_SIZE].permute(1, 2, 0).to(torch.uint8).numpy())
        draw_grid(ax, frame, layout["window_of"][k], cell)
        ax.set_title(f"frames {2 * k},{2 * k + 1} -> temporal patch {k}", fontsize=8)
    fig.suptitle(f"video: {frames.shape[0]} frames at {fps:g} fps, {frames.shape[3]}x{frames.shape[2]} px -> "
                 f"{t} temporal patches x {lh}x{lw} tokens ({second_per_grid:g} s each)"
                 + (f"; first {shown} shown" if shown < t else ""), fontsize=9)
    caption(fig, "frames: processor.fetch_video; grid: processor.preprocess_video (2 frames per "
            "temporal patch); windows, numbered across the whole video: vit.window_layout")
    fig.tight_layout(rect=(0, 0.07, 1, 0.95))
    return fig, layout


# -----------------------------------------------------------------------------
# 2. M-RoPE position ids

def mrope_planes(processor, cfg, image, video=None, min_pixels=None, max_pixels=None,
                 question="What happens in the video?"):
    """Render a one-turn prompt with the image (and the video) through the Processor and compute
    its 3-D position ids with mimovl.get_rope_index. Returns {"input_ids" (L,), "position_ids"
    (3, L), "spans": [(kind, start, (t, lh, lw))] of the vision items, "text": the prompt}."""
    content = [{"type": "image", "image": image}]
    if video is not None:
        content.append({"type": "video", "video": video})
    conversation = [{"role": "user", "content": content + [{"type": "text", "text": question}]}]
    batch = processor(conversation, min_pixels=min_pixels, max_pixels=max_pixels)
    ids = batch["input_ids"][0]
    position_ids, _, _, _ = get_rope_index(ids, cfg, batch.get("image_grid_thw"), batch.get("video_grid_thw"),
                                           batch.get("second_per_grid_ts"))
    m = cfg.vision.spatial_merge_size
    spans, i = [], 0
    grids = {cfg.image_token_id: list(batch.get("image_grid_thw", [])),
             cfg.video_token_id: list(batch.get("video_grid_thw", []))}
    while i < len(ids):
        tok = int(ids[i])
        if tok in grids:
            t, h, w = (int(x) for x in grids[tok].pop(0))
            spans.append(("image" if tok == cfg.image_token_id else "video", i, (t, h // m, w // m)))
            i += t * (h // m) * (w // m)
        else:
            i += 1
    return {"input_ids": ids, "position_ids": position_ids, "spans": spans,
            "text": processor.apply_chat_template(conversation)}


def span_planes(planes, span, k=0):
    """The (3, lh, lw) ids of temporal patch k of one vision span, as laid out on its grid."""
    _, start, (t, lh, lw) = span
    n = lh * lw
    return planes["position_ids"][:, start + k * n:start + (k + 1) * n].reshape(3, lh, lw)


def draw_mrope(planes, tokens_per_second, max_groups=2):
    """Top: the three ids of every token of the prompt (text advances all three together).
    Below: the ids of the image and of the first temporal patches of the video on their grids."""
    plt = pyplot()
    pos = planes["position_ids"]
    panels = [(f"{kind} (t {k})" if kind == "video" else kind, span, k)
              for span in planes["spans"] for kind in [span[0]]
              for k in range(span[2][0] if kind == "video" else 1)][:1 + max_groups]
    fig = plt.figure(figsize=(11, 3.2 + 2.6 * len(panels)))
    gs = fig.add_gridspec(1 + len(panels), 3, height_ratios=[1.3] + [1] * len(panels))
    ax = fig.add_subplot(gs[0, :])
    colours = {"image": "C2", "video": "C4"}
    for kind, start, (t, lh, lw) in planes["spans"]:
        ax.axvspan(start - 0.5, start + t * lh * lw - 0.5, color=colours[kind], alpha=0.15,
                   label=f"{kind} tokens ({t}x{lh}x{lw})")
    for i, name in enumerate(("temporal", "height", "width")):
        ax.plot(range(pos.shape[1]), pos[i].tolist(), drawstyle="steps-mid", label=name,
                linewidth=1.2, linestyle=("-", "--", ":")[i])
    ax.set_xlabel("token position in the prompt")
    ax.set_ylabel("M-RoPE position id")
    ax.set_title("M-RoPE: three position ids per token (text: all three equal, +1 per token; vision: "
                 "t / row / column offsets)", fontsize=9)
    ax.legend(fontsize=7, ncol=3)
    for row, (title, span, k) in enumerate(panels, start=1):
        ids = span_planes(planes, span, k)
        for j, name in enumerate(("temporal", "height", "width")):
            a = fig.add_subplot(gs[row, j])
            a.imshow(ids[j].numpy(), cmap="viridis", vmin=int(ids.min()), vmax=int(ids.max()))
            if ids.shape[1] * ids.shape[2] <= 256:
                for (r, c), v in zip(torch.cartesian_prod(torch.arange(ids.shape[1]), torch.arange(ids.shape[2])).tolist(),
                                     ids[j].flatten().tolist()):
                    a.text(c, r, str(v), ha="center", va="center", fontsize=6, color="white")
            a.set_title(f"{title}: {name} id", fontsize=8)
            a.set_xticks([])
            a.set_yticks([])
    caption(fig, "ids: mimovl.get_rope_index on the input_ids of processor.Processor (chat template, "
            "one token per 2x2 merge cell); after a vision item text resumes at the largest id + 1; "
            f"videos: temporal id = start + group x second_per_grid_t x tokens_per_second ({tokens_per_second:g})")
    fig.tight_layout(rect=(0, 0.02, 1, 1))
    return fig


# -----------------------------------------------------------------------------
# 3. Command line

def load_model_side(model_dir, tmp):
    """(Processor, MiMoVLConfig): a checkpoint's, or the synthetic tokenizer with the tiny preset."""
    if model_dir is None:
        return Processor.from_pretrained(synthetic.train_tokenizer(tmp, n_samples=300)), MiMoVLConfig.preset("tiny")
    path = os.path.join(model_dir, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--model {model_dir}: no config.json there; give a checkpoint folder")
    with open(path) as f:
        cfg = MiMoVLConfig.from_hf_dict(json.load(f))
    return Processor.from_pretrained(model_dir), cfg


def main(argv=None):
    p = argparse.ArgumentParser(description="Draw patches, merge cells, windows and M-RoPE ids for an image")
    p.add_argument("image", help="an image file")
    p.add_argument("--video", default=os.path.join(HERE, "data", "clip"),
                   help="a folder of frames or a video file (default: the repository's data/clip); 'none' for no video")
    p.add_argument("--model", default=None, help="a checkpoint folder: its tokenizer, template and vision config")
    p.add_argument("--min-pixels", type=int, default=None, help="image pixel budget, lower bound (default: the processor's)")
    p.add_argument("--max-pixels", type=int, default=None,
                   help="image pixel budget, upper bound (MiMo-VL's evaluation: 3211264 = 4096 tokens)")
    p.add_argument("--out", default="runs/pictures", help="output folder")
    args = p.parse_args(argv)
    video = None if args.video == "none" else args.video
    if not os.path.isfile(args.image):
        p.error(f"image file not found: {args.image}")
    if video is not None and not os.path.exists(video):
        p.error(f"--video {video}: not found (a folder of frames or a video file, or 'none')")
    os.makedirs(args.out, exist_ok=True)
    plt = pyplot()
    with tempfile.TemporaryDirectory() as tmp:
        try:
            processor, cfg = load_model_side(args.model, tmp)
            written = []
            fig, layout = draw_image_patches(args.image, cfg.vision, args.min_pixels, args.max_pixels)
            written.append(_save(plt, fig, args.out, "patches.png"))
            if video is not None:
                fig, _ = draw_video_patches(video, cfg.vision)
                written.append(_save(plt, fig, args.out, "video_patches.png"))
            planes = mrope_planes(processor, cfg, args.image, video, args.min_pixels, args.max_pixels)
            written.append(_save(plt, draw_mrope(planes, cfg.vision.tokens_per_second), args.out, "mrope.png"))
        except (ValueError, FileNotFoundError) as e:
            p.error(str(e))
    for path in written:
        print(f"wrote {path}")
    return written


def _save(plt, fig, out, name):
    path = os.path.join(out, name)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


if __name__ == "__main__":
    main()

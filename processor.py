"""
processor.py — everything between raw inputs (text, images, videos) and token ids.

  1. Image and video preprocessing: qwen-vl-utils' `smart_resize` / `fetch_video` and
     transformers' `Qwen2VLImageProcessor` (patchify, CLIP normalisation), bit for bit
  2. The chat template (MiMo-VL's, a Qwen2.5-VL template with <think>) and the Processor, which
     renders a conversation, expands every image / video into its visual tokens and returns the
     tensors the model takes (transformers' `Qwen2_5_VLProcessor` semantics). Two deliberate
     differences: message text is tokenised as text (a "<|im_end|>" typed by a user is not the
     control token), and a checkpoint's template runs in a sandbox with a work and size budget.
     Every JSON file of a checkpoint folder is read and type-checked by
     checkpoint_files.read_json_file / check_json_fields (as mimovl.py reads config.json).

This file stands on its own: it imports neither the model nor the kernels.
"""

import base64
import datetime
import functools
import io
import json
import math
import numbers
import re
from pathlib import Path

import jinja2
import jinja2.compiler
import jinja2.ext
import jinja2.nodes
import numpy as np
import torch
import torch.nn.functional as F
from jinja2.sandbox import ImmutableSandboxedEnvironment
from PIL import Image

from checkpoint_files import check_json_fields, read_json_file, write_file_atomic, write_json_atomic

# --- 2.0 The built-in chat template (defined first: the from-scratch tokenizer of section 5 saves it) -----
# Qwen2.5-VL's template (its hub chat_template.json) with MiMo's default system prompt (the one ms-swift registers for
# mimo_vl). Used only for checkpoints that ship no template of their own; official checkpoints bring
# theirs in chat_template.json. Each message renders as "<|im_start|>{role}\n{content}<|im_end|>\n";
# an image item as <|vision_start|><|image_pad|><|vision_end|>, a video item likewise with
# <|video_pad|>; the processor later repeats each pad token once per merged visual token.
DEFAULT_SYSTEM_PROMPT = "You are MiMo, an AI assistant developed by Xiaomi."
DEFAULT_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\n" + DEFAULT_SYSTEM_PROMPT + "<|im_end|>\n"
    "{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}"
    "{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}"
    "{% endif %}"
    "{% endfor %}<|im_end|>\n"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# --- 1.0 Constants (qwen-vl-utils vision_process.py; Qwen2VLImageProcessor) ----------------------------------
PATCH_SIZE = 14  # ViT patch side in pixels
TEMPORAL_PATCH_SIZE = 2  # frames per patch; an image is its own frame twice
MERGE_SIZE = 2  # 2x2 patches merge into one LLM token
IMAGE_FACTOR = PATCH_SIZE * MERGE_SIZE  # 28: resized sides are multiples of this
PATCH_DIM = 3 * TEMPORAL_PATCH_SIZE * PATCH_SIZE * PATCH_SIZE  # 1176 values per patch, (c, t, y, x)
MAX_ASPECT_RATIO = 200
IMAGE_MIN_PIXELS = 4 * 28 * 28  # 3136: qwen-vl-utils and the Qwen2.5-VL hub preprocessor_config
IMAGE_MAX_PIXELS = 16384 * 28 * 28  # 12,845,056: the same two, i.e. up to 16384 tokens per image
MIMO_MAX_PIXELS = 4096 * 28 * 28  # 3,211,264: MiMo-VL's evaluation setting (report §4.1), <= 4096 tokens
VIDEO_MIN_PIXELS = 128 * 28 * 28  # per frame
VIDEO_MAX_PIXELS = 768 * 28 * 28  # per frame
VIDEO_TOTAL_PIXELS = 128000 * 28 * 28 * 0.9  # all frames together: 90% of a 128k-token context
FPS = 2.0  # default frame-sampling rate
FRAME_FACTOR = 2  # frame counts are even (= TEMPORAL_PATCH_SIZE)
FPS_MIN_FRAMES = 4
FPS_MAX_FRAMES = 768
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP normalisation, RGB
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# MiMo-VL's evaluation budgets (report §4.1), a named preset for the chat: images up to 4096*28*28
# pixels, videos sampled at 2 fps, at most 256 frames and a total budget of 16384 tokens (qwen-vl-utils'
# total_pixels, with its per-frame floor of 1.05 * VIDEO_MIN_PIXELS).
PRESETS = {"paper-eval": {"max_pixels": MIMO_MAX_PIXELS,
                          "video": {"fps": 2.0, "max_frames": 256, "total_pixels": 16384 * 28 * 28}}}
FRAME_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff")


# --- 1.1 smart_resize ---------------------------------------------------------------------------------
def smart_resize(height, width, factor=IMAGE_FACTOR, min_pixels=IMAGE_MIN_PIXELS, max_pixels=IMAGE_MAX_PIXELS):
    """(height, width) -> the (h, w) the model sees: multiples of `factor`, h*w in [min_pixels, max_pixels],
    aspect ratio kept as well as that allows. qwen-vl-utils semantics (vision_process.py): the max(factor, .)
    clamp comes first, Python's round() is banker's rounding."""
    if height <= 0 or width <= 0:
        raise ValueError(f"image size must be positive, got height={height}, width={width}")
    if min_pixels > max_pixels:
        raise ValueError(f"min_pixels ({min_pixels}) must not exceed max_pixels ({max_pixels})")
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise ValueError(
            f"image of height {height} and width {width} has aspect ratio "
            f"{max(height, width) / min(height, width):.1f}, above the limit of {MAX_ASPECT_RATIO} that "
            f"Qwen2.5-VL preprocessing accepts; crop or pad it first")
    h_bar = max(factor, round(height / factor) * factor)
    w_bar = max(factor, round(width / factor) * factor)
    if h_bar * w_bar > max_pixels:  # too big: scale down, floor to the grid
        beta = math.sqrt(height * width / max_pixels)
        h_bar = math.floor(height / beta / factor) * factor
        w_bar = math.floor(width / beta / factor) * factor
    elif h_bar * w_bar < min_pixels:  # too small: scale up, ceil to the grid
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


# --- 1.2 Loading images -------------------------------------------------------------------------------
def _to_rgb(img):
    """RGBA is composited onto white (qwen-vl-utils `to_rgb`); every other mode is plainly converted."""
    if img.mode == "RGBA":
        background = Image.new("RGB", img.size, (255, 255, 255))
        background.paste(img, mask=img.split()[3])
        return background
    return img.convert("RGB")


def load_image(image):
    """A path (str/Path, 'file://' or a base64 'data:image' URL), bytes, a PIL image or a uint8 array
    (H,W), (H,W,3) or (H,W,4) -> an RGB PIL image."""
    if isinstance(image, Image.Image):
        return _to_rgb(image)
    if isinstance(image, torch.Tensor):
        image = image.cpu().numpy()
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or not (image.ndim == 2 or (image.ndim == 3 and image.shape[2] in (3, 4))):
            raise ValueError(f"an image array must be uint8 of shape (H,W), (H,W,3) or (H,W,4); "
                             f"got dtype {image.dtype}, shape {tuple(image.shape)}")
        return _to_rgb(Image.fromarray(image))
    if isinstance(image, (bytes, bytearray)):
        return _open_image(io.BytesIO(image), "<bytes>")
    if isinstance(image, (str, Path)):
        text = str(image)
        if text.startswith(("http://", "https://")):
            raise ValueError(f"{text}: images are not downloaded; save the file locally and pass its path")
        if text.startswith("data:image"):
            if "base64," not in text:
                raise ValueError("a data:image URL must be base64-encoded ('data:image/png;base64,...')")
            return _open_image(io.BytesIO(base64.b64decode(text.split("base64,", 1)[1])), "<data URL>")
        path = Path(text[len("file://"):] if text.startswith("file://") else text)
        if not path.is_file():
            raise FileNotFoundError(f"image file not found: {path}")
        with open(path, "rb") as f:
            return _open_image(f, path)
    raise TypeError(f"cannot load an image from a {type(image).__name__}; pass a path, bytes, a PIL image "
                    f"or a uint8 array")


def _open_image(fileobj, name):
    try:
        img = Image.open(fileobj)
        img.load()  # PIL decodes lazily: force it here so a truncated file fails with its name
    except Exception as e:
        raise ValueError(f"cannot read image {name}: {e} (is it a valid image file?)") from e
    return _to_rgb(img)


def resize_image(image, min_pixels=None, max_pixels=None, resized_height=None, resized_width=None):
    """qwen-vl-utils `fetch_image`: load, then PIL bicubic resize to smart_resize's size. With
    resized_height and resized_width the requested size is itself snapped to the 28-grid."""
    img = load_image(image)
    if (resized_height is None) != (resized_width is None):
        raise ValueError("give both resized_height and resized_width, or neither")
    if resized_height is not None:
        h, w = smart_resize(resized_height, resized_width)
    else:
        min_pixels = IMAGE_MIN_PIXELS if min_pixels is None else min_pixels
        max_pixels = IMAGE_MAX_PIXELS if max_pixels is None else max_pixels
        h, w = smart_resize(img.height, img.width, min_pixels=min_pixels, max_pixels=max_pixels)
    return img.resize((w, h), resample=Image.Resampling.BICUBIC)


# --- 1.3 Normalise and patchify (Qwen2VLImageProcessor) ------------------------------------------------
def patchify(frames):
    """frames (T, 3, H, W) float32, H and W multiples of 28 -> (pixel_values [N, 1176], (t, gh, gw)).
    T is padded to a multiple of 2 by repeating the last frame. Rows come block-major over the 2x2
    merge blocks: temporal group, merged row, merged col, sub-row, sub-col; each row is one patch
    flattened as (channel, frame-in-pair, y, x). The same 9-axis permutation as Qwen2VLImageProcessor."""
    if frames.shape[0] % TEMPORAL_PATCH_SIZE:
        pad = frames[-1:].repeat(TEMPORAL_PATCH_SIZE - frames.shape[0] % TEMPORAL_PATCH_SIZE, 1, 1, 1)
        frames = torch.cat([frames, pad])
    T, C, H, W = frames.shape
    gt, gh, gw = T // TEMPORAL_PATCH_SIZE, H // PATCH_SIZE, W // PATCH_SIZE
    x = frames.reshape(gt, TEMPORAL_PATCH_SIZE, C, gh // MERGE_SIZE, MERGE_SIZE, PATCH_SIZE,
                       gw // MERGE_SIZE, MERGE_SIZE, PATCH_SIZE)
    # axes: 0 gt, 1 t, 2 c, 3 lh, 4 sub-row, 5 y, 6 lw, 7 sub-col, 8 x
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return x.reshape(gt * gh * gw, C * TEMPORAL_PATCH_SIZE * PATCH_SIZE * PATCH_SIZE), (gt, gh, gw)


def preprocess_image(image, min_pixels=None, max_pixels=None, resized_height=None, resized_width=None):
    """One image -> (pixel_values [gh*gw, 1176] float32, grid_thw (1, gh, gw)); gh*gw/4 LLM tokens.
    Resize as qwen-vl-utils, then rescale/normalise/patchify as transformers' Qwen2VLImageProcessor."""
    img = resize_image(image, min_pixels, max_pixels, resized_height, resized_width)
    # Same arithmetic as the HF slow processor, so results agree bit for bit: x/255 in float64 cast to
    # float32, then (x - mean) / std in float32.
    x = (np.asarray(img, dtype=np.float64) * (1 / 255)).astype(np.float32)  # (H, W, 3)
    x = (x - np.array(CLIP_MEAN, dtype=np.float32)) / np.array(CLIP_STD, dtype=np.float32)
    frames = torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))[None]  # (1, 3, H, W)
    return patchify(frames)


# --- 1.4 Videos (qwen-vl-utils fetch_video) ------------------------------------------------------------
# A video reaches the model as frames sampled at `fps` (2 by default), an even number of them, all
# resized to one size chosen from a per-frame pixel budget; consecutive frame pairs form one temporal
# patch. Sources: a decoded (T,H,W,3) uint8 array with its `video_fps`, a video file (needs the
# optional `av` package), or frames that are already sampled: a folder of images or a list of images,
# taken at `sample_fps` (default 2.0, as qwen-vl-utils; its `fps` key does not apply to them).
VIDEO_KEYS = ("fps", "nframes", "min_frames", "max_frames", "video_fps", "sample_fps", "video_start",
              "video_end", "min_pixels", "max_pixels", "total_pixels", "resized_height", "resized_width")


def _positive_number(x):
    return isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(x) and x > 0


def smart_nframes(total_frames, video_fps, fps=None, nframes=None, min_frames=None, max_frames=None):
    """How many frames to sample (qwen-vl-utils semantics): `nframes` rounded to even, or `fps` frames
    per second of video clamped to [min_frames, max_frames] and to the video, floored to even."""
    if fps is not None and nframes is not None:
        raise ValueError(f"give a video either fps ({fps}) or nframes ({nframes}), not both")
    if fps is not None and not (_positive_number(fps)):
        raise ValueError(f"a video's fps must be a positive number of frames per second, got {fps!r}")
    if nframes is not None and not (isinstance(nframes, numbers.Integral) and nframes > 0):
        raise ValueError(f"a video's nframes must be a positive integer, got {nframes!r}")
    if nframes is not None:
        n = round(nframes / FRAME_FACTOR) * FRAME_FACTOR
    else:
        fps = FPS if fps is None else fps
        min_frames = FPS_MIN_FRAMES if min_frames is None else min_frames
        min_frames = math.ceil(min_frames / FRAME_FACTOR) * FRAME_FACTOR
        max_frames = min(FPS_MAX_FRAMES, total_frames) if max_frames is None else max_frames
        max_frames = math.floor(max_frames / FRAME_FACTOR) * FRAME_FACTOR
        n = min(max(total_frames / video_fps * fps, min_frames), max_frames, total_frames)
        n = math.floor(n / FRAME_FACTOR) * FRAME_FACTOR
    if not FRAME_FACTOR <= n <= total_frames:
        raise ValueError(f"a video of {total_frames} frames gives {n} sampled frames; need between "
                         f"{FRAME_FACTOR} and {total_frames} (pass a single frame as an image)")
    return int(n)


def video_frame_range(total_frames, video_fps, video_start=None, video_end=None):
    """(first, last, count) frame of the [video_start, video_end] seconds window (qwen-vl-utils'
    decord/torchcodec rule: start rounds up, end rounds down)."""
    if video_start is None and video_end is None:
        return 0, total_frames - 1, total_frames
    duration = total_frames / video_fps
    start = 0 if video_start is None else math.ceil(max(0.0, min(video_start, duration)) * video_fps)
    end = total_frames - 1
    if video_end is not None:
        end = min(math.floor(max(0.0, min(video_end, duration)) * video_fps), total_frames - 1)
    if start >= end:
        raise ValueError(f"video_start={video_start}, video_end={video_end} select no frames of a "
                         f"{duration:.2f} s video ({total_frames} frames at {video_fps} fps)")
    return start, end, end - start + 1


def sample_frame_indices(start, end, nframes):
    """nframes indices evenly spread over [start, end], rounded half to even (torch.linspace float32)."""
    return torch.linspace(start, end, nframes).round().long().tolist()


def video_frame_size(height, width, nframes, min_pixels=None, max_pixels=None, total_pixels=None,
                     resized_height=None, resized_width=None):
    """The (h, w) every frame is resized to. Per-frame budget: at most 768 tokens, and all frames
    together at most total_pixels (frame pairs share a token); a user max_pixels can only lower it."""
    if (resized_height is None) != (resized_width is None):
        raise ValueError("give both resized_height and resized_width, or neither")
    if resized_height is not None:
        return smart_resize(resized_height, resized_width)
    min_pixels = VIDEO_MIN_PIXELS if min_pixels is None else min_pixels
    total_pixels = VIDEO_TOTAL_PIXELS if total_pixels is None else total_pixels
    budget = max(min(VIDEO_MAX_PIXELS, total_pixels / nframes * FRAME_FACTOR), int(min_pixels * 1.05))
    if max_pixels is not None:
        budget = min(max_pixels, budget)
    return smart_resize(height, width, min_pixels=min_pixels, max_pixels=budget)


def _frame_files(folder):
    """Image files of a folder in natural order (frame_2 before frame_10)."""
    files = [p for p in folder.iterdir() if p.suffix.lower() in FRAME_EXTENSIONS]
    return sorted(files, key=lambda p: [int(s) if s.isdigit() else s for s in re.split(r"(\d+)", p.name)])


def _read_video_file(path, fps, nframes, min_frames, max_frames, video_start, video_end):
    """Decode a video file with PyAV -> (sampled frames (n,H,W,3) uint8, video fps, frames in range).
    Two passes: count the frames (containers often misreport it), then keep only the sampled ones."""
    try:
        import av
    except ImportError as e:
        raise ImportError(f"reading the video file {path} needs the optional 'av' package (pip install av); "
                          f"or pass a folder of frames, a list of images, or a (T,H,W,3) uint8 array "
                          f"with its video_fps") from e
    if not path.is_file():
        raise FileNotFoundError(f"video file not found: {path}")
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise ValueError(f"{path} has no video stream")
            stream = container.streams.video[0]
            video_fps = float(stream.average_rate or stream.guessed_rate or 0)
            total = sum(1 for _ in container.decode(stream))
        if total == 0:
            raise ValueError(f"video {path} has no frames")
        if video_fps <= 0:
            raise ValueError(f"video {path} does not say its frame rate")
        start, end, count = video_frame_range(total, video_fps, video_start, video_end)
        n = smart_nframes(count, video_fps, fps, nframes, min_frames, max_frames)
        wanted = set(sample_frame_indices(start, end, n))
        with av.open(str(path)) as container:
            frames = [f.to_ndarray(format="rgb24") for i, f in enumerate(container.decode(video=0)) if i in wanted]
    except av.error.FFmpegError as e:
        raise ValueError(f"cannot read video {path}: {e}") from e
    return np.stack(frames), video_fps, count


def fetch_video(video, fps=None, nframes=None, min_frames=None, max_frames=None, video_fps=None,
                sample_fps=None, video_start=None, video_end=None, min_pixels=None, max_pixels=None,
                total_pixels=None, resized_height=None, resized_width=None):
    """qwen-vl-utils `fetch_video`: -> (frames (T, 3, h, w) float32 in [0, 255], sample_fps), T even.
    `video`: a folder of frames, a list of images, a (T,H,W,3) uint8 array (with video_fps) or a file."""
    if isinstance(video, (str, Path)) and str(video).startswith("file://"):
        video = str(video)[len("file://"):]
    if isinstance(video, (str, Path)) and Path(video).is_dir():
        files = _frame_files(Path(video))
        if not files:
            raise ValueError(f"video folder {video} has no frames (image files: {', '.join(FRAME_EXTENSIONS)})")
        video = files
    if isinstance(video, (list, tuple)):
        # Already-sampled frames. qwen-vl-utils first passes each one through fetch_image (image
        # budget), pads to an even count, then applies the video budget below.
        if not video:
            raise ValueError("video has no frames: the frame list is empty")
        images = [resize_image(f, min_pixels, max_pixels, resized_height, resized_width) for f in video]
        for i, img in enumerate(images):
            if img.size != images[0].size:
                raise ValueError(f"all frames of a video must have one size; frame {i} resizes to {img.size} "
                                 f"(width, height), frame 0 to {images[0].size}")
        images += images[-1:] * (-len(images) % FRAME_FACTOR)
        frames = torch.from_numpy(np.stack([np.asarray(img) for img in images]))
        sample_fps = FPS if sample_fps is None else sample_fps
        if not (_positive_number(sample_fps)):
            raise ValueError(f"a video's sample_fps (the rate its frames were taken at) must be a positive "
                             f"number, got {sample_fps!r}")
    else:
        if isinstance(video, (str, Path)):
            array, video_fps, count = _read_video_file(Path(video), fps, nframes, min_frames, max_frames,
                                                       video_start, video_end)
            frames = torch.from_numpy(array)
        else:
            frames = torch.as_tensor(video)
            if frames.dtype != torch.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
                raise ValueError(f"a video array must be uint8 of shape (T, H, W, 3); got dtype "
                                 f"{frames.dtype}, shape {tuple(frames.shape)}")
            if frames.shape[0] == 0:
                raise ValueError("video has no frames: the array has T = 0")
            if not (_positive_number(video_fps)):
                raise ValueError("a video array needs its frame rate: add 'video_fps' (frames per second)")
            start, end, count = video_frame_range(frames.shape[0], video_fps, video_start, video_end)
            n = smart_nframes(count, video_fps, fps, nframes, min_frames, max_frames)
            frames = frames[sample_frame_indices(start, end, n)]
        sample_fps = frames.shape[0] / count * video_fps
    frames = frames.permute(0, 3, 1, 2)  # (T, 3, H, W) uint8
    h, w = video_frame_size(frames.shape[2], frames.shape[3], frames.shape[0], min_pixels, max_pixels,
                            total_pixels, resized_height, resized_width)
    if (h, w) == tuple(frames.shape[2:]):
        return frames.float(), sample_fps
    # torchvision's tensor resize (what qwen-vl-utils calls): bicubic with antialias in float, then
    # clamped and rounded back to uint8 values.
    x = F.interpolate(frames.float(), size=(h, w), mode="bicubic", align_corners=False, antialias=True)
    return x.clamp(0, 255).round(), sample_fps


def preprocess_video(video, **options):
    """One video -> (pixel_values_videos [t*gh*gw, 1176] float32, grid_thw (t, gh, gw),
    second_per_grid_t). `options` are the VIDEO_KEYS of a video item; see fetch_video."""
    frames, sample_fps = fetch_video(video, **options)
    # The HF video processor fuses rescale and normalise: (x - 255*mean) / (255*std) in float32.
    mean = torch.tensor(CLIP_MEAN) * 255.0
    std = torch.tensor(CLIP_STD) * 255.0
    frames = (frames - mean[:, None, None]) / std[:, None, None]
    pixel_values, grid_thw = patchify(frames)
    return pixel_values, grid_thw, TEMPORAL_PATCH_SIZE / sample_fps


# --- 2.1 Chat template rendering ----------------------------------------------------------------------
# A chat template comes with the checkpoint, i.e. from whoever published it: it runs in jinja2's
# immutable sandbox (as in transformers), which blocks attribute escapes, and here also within a
# budget, because the sandbox alone does not bound work or memory ('x' * 200000000, nested loops).
# Every string a template builds and the rendered prompt stay under MAX_TEMPLATE_CHARS (128k tokens
# are about half a million characters), and a render may take at most MAX_TEMPLATE_STEPS loop
# iterations, calls, lookups and operators (a 1,000-turn conversation takes about 100,000).
MAX_TEMPLATE_CHARS = 10_000_000
MAX_TEMPLATE_STEPS = 2_000_000
_FORMAT_WIDTH = re.compile(r"%[-+ #0]*\d{8}|\{[^{}]*:[^{}]*\d{8}")  # a field padded to >= 10^7 chars
_PADDING_METHODS = ("ljust", "rjust", "center", "zfill", "expandtabs")
_PADDING_FILTERS = ("center", "indent", "wordwrap")


class _BoundedCodeGenerator(jinja2.compiler.CodeGenerator):
    """Compiles every for-loop's iterable and every `~` concatenation through the environment's
    budget checks (`_BoundedSandbox.counted`, `_BoundedSandbox.sized`); the rest is jinja2's."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.loop_iterables = set()

    def visit_For(self, node, frame):
        self.loop_iterables.add(id(node.iter))
        super().visit_For(node, frame)

    def visit(self, node, *args, **kwargs):
        if id(node) not in self.loop_iterables:
            return super().visit(node, *args, **kwargs)
        self.write("environment.counted(")
        super().visit(node, *args, **kwargs)
        self.write(")")

    def visit_Concat(self, node, frame):
        self.write("environment.sized(")
        super().visit_Concat(node, frame)
        self.write(")")


class _BoundedSandbox(ImmutableSandboxedEnvironment):
    """transformers' template sandbox with a work and size budget per render (`render`)."""

    code_generator_class = _BoundedCodeGenerator
    intercepted_binops = frozenset(["*", "**", "+", "%"])

    def step(self):
        self.steps += 1
        if self.steps > MAX_TEMPLATE_STEPS:
            raise jinja2.exceptions.SecurityError(
                f"it takes more than {MAX_TEMPLATE_STEPS:,} steps (loops, calls, lookups)")

    def sized(self, value):
        if isinstance(value, (str, list, tuple)) and len(value) > MAX_TEMPLATE_CHARS:
            raise jinja2.exceptions.SecurityError(
                f"it builds a {type(value).__name__} of more than {MAX_TEMPLATE_CHARS:,} items")
        return value

    def counted(self, iterable):
        for item in iterable:
            self.step()
            yield item

    @staticmethod
    def _check_padding(width=0, format_string=""):
        """Refuse before allocating: padding to a width above the budget ('x'.ljust(10**9),
        'x' | center(10**9)) or a format string that pads a field to >= 10^7 characters."""
        if isinstance(width, int) and width > MAX_TEMPLATE_CHARS:
            raise jinja2.exceptions.SecurityError(f"it pads a string to {width:,} characters")
        if isinstance(format_string, str) and _FORMAT_WIDTH.search(format_string):
            raise jinja2.exceptions.SecurityError("it formats a field wider than 10^7 characters")

    def call_binop(self, context, operator, left, right):
        self.step()
        if operator == "*":
            for seq, n in ((left, right), (right, left)):
                if isinstance(seq, (str, list, tuple)) and isinstance(n, int) and len(seq) * n > MAX_TEMPLATE_CHARS:
                    raise jinja2.exceptions.SecurityError(f"it repeats a {type(seq).__name__} {n:,} times")
        if operator == "**" and isinstance(left, int) and isinstance(right, int) and \
                right * abs(left).bit_length() > 4096:
            raise jinja2.exceptions.SecurityError(f"it computes {left} ** {right}")
        if operator == "%":
            self._check_padding(format_string=left)
        return self.sized(super().call_binop(context, operator, left, right))

    def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (jinja2's signature)
        __self.step()
        if isinstance(getattr(__obj, "__self__", None), str) and __obj.__name__ in _PADDING_METHODS:
            __self._check_padding(width=(args or [*kwargs.values(), 0])[0])
        return __self.sized(super().call(__context, __obj, *args, **kwargs))

    def getattr(self, obj, attribute):
        self.step()
        if attribute in ("format", "format_map") and isinstance(obj, str):
            self._check_padding(format_string=obj)
        return self.sized(super().getattr(obj, attribute))

    def getitem(self, obj, argument):
        self.step()
        return self.sized(super().getitem(obj, argument))

    def bounded_filter(self, name, f):
        """A filter that counts as a step, checks padding widths (center, indent, wordwrap's and
        format's) and checks its result's size."""
        def checked(*args, **kwargs):
            self.step()
            values = [a for a in args if isinstance(a, (str, int))] + list(kwargs.values())
            if name == "format" and values:
                self._check_padding(format_string=values[0])
            elif name in _PADDING_FILTERS and len(values) > 1:
                self._check_padding(width=values[1])
            return self.sized(f(*args, **kwargs))
        return functools.update_wrapper(checked, f)

    def render(self, template, **variables):
        """Render with the budget, streaming, so an oversized prompt stops at the limit."""
        self.steps, pieces, size = 0, [], 0
        for piece in template.generate(**variables):
            size += len(piece)
            if size > MAX_TEMPLATE_CHARS:
                raise jinja2.exceptions.SecurityError(f"it renders more than {MAX_TEMPLATE_CHARS:,} characters")
            pieces.append(piece)
        return "".join(pieces)


def _compile_chat_template(template):
    """Compile a checkpoint's Jinja chat template in the bounded sandbox, with the globals and filters
    that transformers gives templates (raise_exception, strftime_now, a non-escaping tojson, loop
    controls, and the {% generation %} tag, which here simply renders its body). Returns
    (environment, template)."""

    class GenerationTag(jinja2.ext.Extension):
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt):
        return datetime.datetime.now().strftime(fmt)

    env = _BoundedSandbox(trim_blocks=True, lstrip_blocks=True, extensions=[GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.filters = {name: env.bounded_filter(name, f) for name, f in env.filters.items()}
    env.globals.pop("lipsum")  # lorem-ipsum text of any length in one call; no chat template uses it
    env.globals.update(raise_exception=raise_exception, strftime_now=strftime_now)
    try:
        return env, env.from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise ValueError(f"the chat template does not parse (line {e.lineno}): {e.message}") from e


def _token_text(token):
    """tokenizer_config.json writes a special token as a string or as {"content": ...}."""
    return token["content"] if isinstance(token, dict) else token


def _find_chat_template(folder, tokenizer_config):
    """The checkpoint's own template: chat_template.jinja, chat_template.json, then tokenizer_config.json
    (a string, or a list of named templates); None when it has none."""
    if (folder / "chat_template.jinja").is_file():
        try:
            return (folder / "chat_template.jinja").read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"{folder / 'chat_template.jinja'} is not UTF-8 text ({e})") from None
    template_file = folder / "chat_template.json"
    template = check_json_fields(read_json_file(template_file), template_file,
                                 {"chat_template": TOKENIZER_CONFIG_KINDS["chat_template"]}).get("chat_template")
    if template is None:
        template = tokenizer_config.get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
        named = {t.get("name"): t.get("template") for t in template}
        if "default" not in named:
            raise ValueError(f"{folder / 'tokenizer_config.json'} lists chat templates {sorted(named)} "
                             f"but no 'default'")
        template = named["default"]
    return template


def split_thinking(text):
    """'<think>R</think>A' -> (R, A), both stripped. Without </think> the text is all answer, unless it
    opened a <think> that never closed (a cut-off generation): then it is all reasoning."""
    end = text.find("</think>")
    if end >= 0:
        start = text.find("<think>", 0, end)
        begin = start + len("<think>") if start >= 0 else 0
        return text[begin:end].strip(), text[end + len("</think>"):].strip()
    start = text.find("<think>")
    if start >= 0:
        return text[start + len("<think>"):].strip(), text[:start].strip()
    return "", text.strip()


# --- 2.2 Checkpoint folder files: the schemas of the ones the Processor reads -------------------------
# Each file goes through checkpoint_files.read_json_file and check_json_fields, so a wrong type is one
# clear error that names the file, the key and the value.
TOKENIZER_CONFIG_KINDS = {**{k: "token (a string or {\"content\": string})" for k in (
    "bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")},
    "additional_special_tokens": "list of tokens",
    "chat_template": "chat template (a string or a list of {\"name\", \"template\"})"}
PREPROCESSOR_KINDS = {"min_pixels": "positive integer", "max_pixels": "positive integer", "size": "object",
                      "patch_size": "positive integer", "temporal_patch_size": "positive integer",
                      "merge_size": "positive integer", "image_mean": "list of 3 numbers",
                      "image_std": "list of 3 numbers"}
PREPROCESSOR_SIZE_KINDS = {"shortest_edge": "positive integer", "longest_edge": "positive integer"}
GENERATION_KINDS = {"eos_token_id": "token id or list of token ids", "do_sample": "boolean",
                    "temperature": "number >= 0", "top_p": "number in (0, 1]", "top_k": "integer >= 0",
                    "max_new_tokens": "positive integer"}


# --- 2.3 The Processor --------------------------------------------------------------------------------
# Thinking control (MiMo-VL GitHub README and its issues #6 / #30). MiMo-VL thinks by default:
# think=True changes nothing. think=False uses one of the documented switches:
#   "prefill": the assistant turn starts with an empty thought "<think>\n</think>\n" (2025-06 models,
#              maintainer-documented and used by MiMo's eval wrapper; deterministic);
#   "suffix":  "\n<no_think>\n" appended to the last user message (2025-06, maintainer-recommended);
#   "slash":   " /no_think" appended to the last user message (the 2508 models, whose chat template
#              handles it). no_think_style_for() picks one from the checkpoint's template.
NO_THINK_PREFILL = "<think>\n</think>\n"
NO_THINK_SUFFIXES = {"suffix": "\n<no_think>\n", "slash": " /no_think"}
NO_THINK_STYLES = ("prefill", *NO_THINK_SUFFIXES)
_TEMPLATE_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token",
                        "mask_token")


def no_think_style_for(chat_template):
    """(style, reason): "slash" when the chat template itself handles "/no_think" (the 2508
    models'), else "prefill", which every MiMo-VL checkpoint understands."""
    if chat_template and "/no_think" in chat_template:
        return "slash", "the chat template handles '/no_think' (MiMo-VL 2508 style)"
    return "prefill", "the chat template does not handle '/no_think'; an empty <think></think> is prefilled (2025-06 style)"


# Text is encoded as text. transformers renders the template and tokenises the whole string with
# special-token parsing, so a message that contains "<|im_end|>\n<|im_start|>assistant\nX" becomes
# control tokens: in training data X turns into a label, in a chat the user forges a turn. We
# deliberately differ: before rendering, every special-token string inside the conversation's
# values is swapped for a marker character (Unicode private-use plane 16); after rendering only the
# template's own special tokens, and the image/video placeholders it writes, become control tokens,
# and everything between them is tokenised with special-token parsing off, markers turned back
# into their text. For text without special-token strings the ids are exactly transformers'.
# Non-special added tokens (<think>, </think>) are text-level tokens and keep their ids.
_MARK_BASE = 0x100000           # marker of special token i: chr(_MARK_BASE + i)
_MARK_ESCAPE = "\U0010fffd"     # precedes a literal plane-16 character of the content


def _is_image_item(item):  # the same test the Qwen2.5-VL template makes

    return item.get("type") == "image" or "image" in item or "image_url" in item


def _is_video_item(item):
    return item.get("type") == "video" or "video" in item


def _media_items(conversations):
    """The image and video items of a batch of conversations, in the order the template renders them."""
    for conversation in conversations:
        for message in conversation:
            content = message.get("content")
            if content is None or isinstance(content, str):
                continue
            for item in content:
                if not isinstance(item, dict):
                    raise ValueError(f"a message's content list holds dicts like {{'type': 'text', 'text': ...}}, "
                                     f"got a {type(item).__name__}: {item!r:.80}")
                if _is_image_item(item) or _is_video_item(item):
                    yield item


class Processor:
    """Conversations -> model inputs with Hugging Face names (transformers' `Qwen2_5_VLProcessor`
    and the checkpoint's tokenizer and chat template files).

        processor = Processor.from_pretrained("MiMo-VL-7B-RL")
        batch = processor([{"role": "user", "content": [{"type": "image", "image": "cat.jpg"},
                                                        {"type": "text", "text": "What is this?"}]}])
        # input_ids, attention_mask, pixel_values, image_grid_thw (+ video keys when there are videos)

    `tokenizer` is a `tokenizers.Tokenizer`; the ids of the special tokens are read from it.
    `no_think_style` None picks it from the template (no_think_style_for). `generation_config`
    holds generation_config.json's sampling keys (temperature, top_p, top_k, max_new_tokens,
    do_sample) for the chat's defaults."""

    def __init__(self, tokenizer, chat_template=None, *, image_token="<|image_pad|>", video_token="<|video_pad|>",
                 eos_token="<|im_end|>", pad_token=None, eos_token_ids=None, template_tokens=None,
                 min_pixels=IMAGE_MIN_PIXELS, max_pixels=IMAGE_MAX_PIXELS, no_think_style=None,
                 generation_config=None):
        self.tokenizer = tokenizer
        tokenizer.no_padding()  # the processor pads (left) and never truncates a prompt silently
        tokenizer.no_truncation()
        self.chat_template = chat_template or DEFAULT_CHAT_TEMPLATE
        self._env, self._template = _compile_chat_template(self.chat_template)
        if no_think_style is None:
            no_think_style, self.no_think_reason = no_think_style_for(self.chat_template)
        elif no_think_style in NO_THINK_STYLES:
            self.no_think_reason = "chosen explicitly"
        else:
            raise ValueError(f"no_think_style must be 'prefill', 'suffix' or 'slash', got {no_think_style!r}")
        self.no_think_style = no_think_style
        self.image_token, self.video_token = image_token, video_token
        self.image_token_id = self._token_id(image_token)
        self.video_token_id = self._token_id(video_token)
        self.vision_start_token_id = tokenizer.token_to_id("<|vision_start|>")
        if pad_token is None:  # Qwen pads with <|endoftext|>
            pad_token = "<|endoftext|>" if tokenizer.token_to_id("<|endoftext|>") is not None else eos_token
        self.pad_token_id = self._token_id(pad_token)
        if eos_token_ids is None:  # stop on <|im_end|>, and on <|endoftext|> defensively (Qwen's generation_config)
            eos_token_ids = [self._token_id(eos_token)]
            if tokenizer.token_to_id("<|endoftext|>") is not None:
                eos_token_ids.append(tokenizer.token_to_id("<|endoftext|>"))
        if isinstance(eos_token_ids, int):  # generation_config.json may hold one id or a list
            eos_token_ids = [eos_token_ids]
        self.eos_token_ids = list(dict.fromkeys(eos_token_ids))
        self.eos_token_id = self.eos_token_ids[0]
        # Variables a template may use ({{ eos_token }}), as transformers passes them.
        if template_tokens is None:
            template_tokens = {"eos_token": eos_token, "pad_token": pad_token}
        self.template_tokens = template_tokens
        self.min_pixels, self.max_pixels = min_pixels, max_pixels
        self.generation_config = dict(generation_config or {})
        # Text-as-text encoding (see above): the control tokens, and a tokenizer twin that reads
        # special-token strings as plain text.
        specials = [t.content for t in tokenizer.get_added_tokens_decoder().values() if t.special]
        self._control_ids = {t: tokenizer.token_to_id(t) for t in specials}
        self._control = re.compile("|".join(re.escape(t) for t in sorted(specials, key=len, reverse=True))) \
            if specials else None
        self._marks = {t: chr(_MARK_BASE + i) for i, t in enumerate(specials)}
        self._unmarks = {m: t for t, m in self._marks.items()}
        self._text_tokenizer = type(tokenizer).from_str(tokenizer.to_str())
        self._text_tokenizer.encode_special_tokens = True

    def _token_id(self, token):
        token_id = self.tokenizer.token_to_id(token)
        if token_id is None:
            raise ValueError(f"the tokenizer has no token {token!r}; a Qwen2.5-VL-style tokenizer needs it")
        return token_id

    @classmethod
    def from_pretrained(cls, path, **kwargs):
        """Load from a checkpoint folder: tokenizer.json, and when present tokenizer_config.json (special
        tokens, template), chat_template.jinja/.json, preprocessor_config.json (pixel budget) and
        generation_config.json (stop tokens, sampling defaults), each type-checked with a clear
        error naming the file. `kwargs` override the constructor's arguments."""
        from tokenizers import Tokenizer

        folder = Path(path)
        if not folder.is_dir():
            raise FileNotFoundError(f"model folder {folder} does not exist")
        if not (folder / "tokenizer.json").is_file():
            raise FileNotFoundError(f"{folder / 'tokenizer.json'} not found; download it with the weights")
        try:
            tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        except Exception as e:  # the Rust library raises a bare Exception for every parse error
            raise ValueError(f"{folder / 'tokenizer.json'} is not a readable tokenizer ({e}); download it again") from None
        config_file = folder / "tokenizer_config.json"
        config = check_json_fields(read_json_file(config_file), config_file, TOKENIZER_CONFIG_KINDS)
        template_tokens = {k: _token_text(config[k]) for k in _TEMPLATE_TOKEN_KEYS if config.get(k)}
        if config.get("additional_special_tokens"):
            template_tokens["additional_special_tokens"] = [
                _token_text(t) for t in config["additional_special_tokens"]]
        pre_file = folder / "preprocessor_config.json"
        pre = check_json_fields(read_json_file(pre_file), pre_file, PREPROCESSOR_KINDS)
        size = check_json_fields(pre.get("size") or {}, pre_file, PREPROCESSOR_SIZE_KINDS, prefix="size.")
        supported = (("patch_size", PATCH_SIZE), ("temporal_patch_size", TEMPORAL_PATCH_SIZE),
                     ("merge_size", MERGE_SIZE))
        for key, value in supported:
            if pre.get(key, value) != value:
                raise ValueError(f"{pre_file}: {key}={pre[key]} is not supported (only {value})")
        for key, value in (("image_mean", CLIP_MEAN), ("image_std", CLIP_STD)):
            if not np.allclose(pre.get(key, value), value, rtol=0, atol=1e-6):
                raise ValueError(f"{pre_file}: {key}={pre[key]} is not supported (only CLIP's {list(value)})")
        generation_file = folder / "generation_config.json"
        generation = check_json_fields(read_json_file(generation_file), generation_file, GENERATION_KINDS)
        options = dict(
            eos_token=template_tokens.get("eos_token", "<|im_end|>"),
            pad_token=template_tokens.get("pad_token"),
            eos_token_ids=generation.get("eos_token_id"),
            template_tokens=template_tokens,
            min_pixels=pre.get("min_pixels", size.get("shortest_edge", IMAGE_MIN_PIXELS)),
            max_pixels=pre.get("max_pixels", size.get("longest_edge", IMAGE_MAX_PIXELS)),
            generation_config={k: generation[k] for k in GENERATION_KINDS
                               if k != "eos_token_id" and generation.get(k) is not None},
        )
        if options["min_pixels"] > options["max_pixels"]:
            raise ValueError(f"{pre_file}: min_pixels={options['min_pixels']} is above max_pixels={options['max_pixels']}")
        options.update(kwargs)
        if "chat_template" not in options:
            options["chat_template"] = _find_chat_template(folder, config)
        return cls(tokenizer, **options)

    def save_pretrained(self, path):
        """Write tokenizer.json, tokenizer_config.json, chat_template.json and preprocessor_config.json
        (each atomically), loadable by from_pretrained and by transformers (PreTrainedTokenizerFast,
        Qwen2VLImageProcessor)."""
        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        write_file_atomic(folder / "tokenizer.json", self.tokenizer.save)
        files = {
            "tokenizer_config.json": {**self.template_tokens, "tokenizer_class": "PreTrainedTokenizerFast",
                                      "clean_up_tokenization_spaces": False, "model_max_length": 131072},
            "chat_template.json": {"chat_template": self.chat_template},
            "preprocessor_config.json": {
                "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2_5_VLProcessor",
                "do_resize": True, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
                "do_convert_rgb": True, "resample": 3, "image_mean": list(CLIP_MEAN), "image_std": list(CLIP_STD),
                "min_pixels": self.min_pixels, "max_pixels": self.max_pixels, "patch_size": PATCH_SIZE,
                "temporal_patch_size": TEMPORAL_PATCH_SIZE, "merge_size": MERGE_SIZE},
        }
        for name, content in files.items():
            write_json_atomic(folder / name, content)

    # -- text ------------------------------------------------------------------------------------------
    def _render(self, conversation, add_generation_prompt=True, think=True, **template_kwargs):
        """The prompt with every special-token string of the conversation's own text as a marker."""
        if not think and self.no_think_style in NO_THINK_SUFFIXES:
            conversation = self._append_to_last_user(conversation, NO_THINK_SUFFIXES[self.no_think_style])
        variables = {**self.template_tokens, **template_kwargs}
        try:
            text = self._env.render(self._template, messages=self._mark(conversation), tools=None,
                                    documents=None, add_generation_prompt=add_generation_prompt, **variables)
        except jinja2.exceptions.SecurityError as e:
            raise ValueError(f"the chat template was stopped: {e}") from None
        except jinja2.exceptions.TemplateError as e:  # raise_exception(...), undefined names
            raise ValueError(f"the chat template rejected the conversation: {e}") from None
        except (RecursionError, MemoryError, ArithmeticError, TypeError, LookupError, AttributeError) as e:
            raise ValueError(f"the chat template failed: {type(e).__name__}: {str(e)[:200]}") from None
        if not think and self.no_think_style == "prefill":
            if not add_generation_prompt:
                raise ValueError("think=False with no_think_style='prefill' prefills the assistant turn; "
                                 "it needs add_generation_prompt=True")
            text += NO_THINK_PREFILL
        return text

    def apply_chat_template(self, conversation, add_generation_prompt=True, think=True, **template_kwargs):
        """One conversation -> the prompt string (vision placeholders not yet expanded)."""
        return self._unmark(self._render(conversation, add_generation_prompt, think, **template_kwargs))

    def _mark(self, value):
        """A copy of a conversation (nested dicts / lists) with special-token strings in its strings
        replaced by markers (literal plane-16 characters escaped); other values are kept as they are."""
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise ValueError(f"the text {value[:60]!r} is not valid Unicode (a lone surrogate, "
                                 "e.g. from bytes that were not UTF-8)") from None
            if any(ord(c) >= _MARK_BASE for c in value):
                value = "".join(_MARK_ESCAPE + c if ord(c) >= _MARK_BASE else c for c in value)
            return self._control.sub(lambda m: self._marks[m.group()], value) if self._control else value
        if isinstance(value, dict):
            return {k: self._mark(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [self._mark(v) for v in value]
        return value

    def _unmark(self, text):
        if not any(ord(c) >= _MARK_BASE for c in text):
            return text
        out, chars = [], iter(text)
        for c in chars:
            out.append(next(chars, "") if c == _MARK_ESCAPE else self._unmarks.get(c, c))
        return "".join(out)

    def _encode_rendered(self, text):
        """Marked prompt -> ids: the template's special tokens are control tokens, the text between
        them is tokenised as text (special-token strings inside it included)."""
        ids, start = [], 0
        for m in (self._control.finditer(text) if self._control else ()):
            if m.start() > start:
                ids += self._text_tokenizer.encode(self._unmark(text[start:m.start()]), add_special_tokens=False).ids
            ids.append(self._control_ids[m.group()])
            start = m.end()
        if start < len(text):
            ids += self._text_tokenizer.encode(self._unmark(text[start:]), add_special_tokens=False).ids
        return ids

    @staticmethod
    def _append_to_last_user(conversation, suffix):
        """A copy of the conversation with `suffix` at the end of the last user message's text."""
        users = [i for i, m in enumerate(conversation) if m.get("role") == "user"]
        if not users:
            raise ValueError("think=False appends the no-think switch to a user message, "
                             "but the conversation has none")
        conversation = list(conversation)
        message = dict(conversation[users[-1]])
        content = message["content"]
        if isinstance(content, str):
            message["content"] = content + suffix
        elif content and content[-1].get("type") == "text":
            message["content"] = [*content[:-1], {**content[-1], "text": content[-1]["text"] + suffix}]
        else:  # the switch must be the very last thing, after any image
            message["content"] = [*content, {"type": "text", "text": suffix}]
        conversation[users[-1]] = message
        return conversation

    def encode(self, text):
        """A prompt string -> token ids, special-token strings read as special tokens (as a
        template's output is; no placeholder expansion)."""
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def encode_text(self, text):
        """Text (a document, a message) -> token ids with every character read as text:
        "<|im_end|>" in it is the six-odd tokens that spell it, never the control token."""
        return self._text_tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids, skip_special_tokens=False):
        """One sequence of ids (list or 1-D tensor) -> text."""
        if isinstance(ids, torch.Tensor):
            if ids.ndim > 1:
                raise ValueError(f"decode takes one sequence, got a tensor of shape {tuple(ids.shape)}; "
                                 f"use batch_decode")
            ids = ids.tolist()
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def batch_decode(self, sequences, skip_special_tokens=False):
        return [self.decode(ids, skip_special_tokens) for ids in sequences]

    # -- vision ----------------------------------------------------------------------------------------
    def vision_inputs(self, conversations, min_pixels=None, max_pixels=None):
        """Every image and video item of a batch of conversations, in order of appearance ->
        pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw, second_per_grid_ts (only the
        keys that have items). An image item's own min_pixels/max_pixels/resized_* win over the
        arguments, which win over the processor's budget (preprocessor_config.json)."""
        min_pixels = self.min_pixels if min_pixels is None else min_pixels
        max_pixels = self.max_pixels if max_pixels is None else max_pixels
        images, videos = [], []
        for item in _media_items(conversations):
            if _is_image_item(item):
                source = item.get("image", item.get("image_url"))
                if isinstance(source, dict):  # OpenAI style {"image_url": {"url": ...}}
                    source = source.get("url")
                if source is None:
                    raise ValueError(f"an image item has no 'image' (a path, bytes, PIL image or array): {item}")
                images.append(preprocess_image(
                    source, item.get("min_pixels", min_pixels), item.get("max_pixels", max_pixels),
                    item.get("resized_height"), item.get("resized_width")))
            else:
                if item.get("video") is None:
                    raise ValueError(f"a video item has no 'video' (a file, folder, frame list or array): {item}")
                videos.append(preprocess_video(item["video"], **{k: item[k] for k in VIDEO_KEYS if k in item}))
        out = {}
        if images:
            out["pixel_values"] = torch.cat([pv for pv, _ in images])
            out["image_grid_thw"] = torch.tensor([grid for _, grid in images], dtype=torch.long)
        if videos:
            out["pixel_values_videos"] = torch.cat([pv for pv, _, _ in videos])
            out["video_grid_thw"] = torch.tensor([grid for _, grid, _ in videos], dtype=torch.long)
            out["second_per_grid_ts"] = torch.tensor([s for _, _, s in videos], dtype=torch.float32)
        return out

    def expand_vision_tokens(self, texts, image_grid_thw=None, video_grid_thw=None):
        """Repeat the k-th image (video) pad token of the batch t*h*w/4 times, the number of merged
        tokens its grid makes (as Qwen2_5_VLProcessor does)."""
        out = list(texts)
        for token, grids in ((self.image_token, image_grid_thw), (self.video_token, video_grid_thw)):
            counts = [] if grids is None else [int(g.prod()) // MERGE_SIZE ** 2 for g in torch.as_tensor(grids)]
            found = sum(text.count(token) for text in out)
            if found != len(counts):
                raise ValueError(f"the prompt has {found} {token} placeholders but {len(counts)} "
                                 f"{'images' if token == self.image_token else 'videos'} were given")
            k = 0
            for i, text in enumerate(out):
                pieces = text.split(token)
                expanded = [pieces[0]]
                for piece in pieces[1:]:
                    expanded += [token * counts[k], piece]
                    k += 1
                out[i] = "".join(expanded)
        return out

    # -- everything ------------------------------------------------------------------------------------
    def __call__(self, conversations, add_generation_prompt=True, think=True, min_pixels=None,
                 max_pixels=None, **template_kwargs):
        """One conversation (a list of messages) or a batch of them -> dict of tensors: input_ids and
        attention_mask (B, T), left-padded with pad_token_id, plus the vision inputs (vision_inputs)."""
        if not conversations:
            raise ValueError("no conversation given")
        batch = [conversations] if isinstance(conversations[0], dict) else list(conversations)
        texts = [self._render(c, add_generation_prompt, think, **template_kwargs) for c in batch]
        out = self.vision_inputs(batch, min_pixels, max_pixels)
        texts = self.expand_vision_tokens(texts, out.get("image_grid_thw"), out.get("video_grid_thw"))
        ids = [self._encode_rendered(text) for text in texts]
        length = max(len(x) for x in ids)
        input_ids = torch.full((len(ids), length), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(ids), length), dtype=torch.long)
        for row, x in enumerate(ids):  # left padding: the prompts end together, where generation starts
            input_ids[row, length - len(x):] = torch.tensor(x, dtype=torch.long)
            attention_mask[row, length - len(x):] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask, **out}

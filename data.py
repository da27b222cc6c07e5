"""
data.py — everything between raw inputs and token tensors.

  1. Image and video preprocessing (qwen-vl-utils + Qwen2VLImageProcessor semantics, SPEC §4.2, §5)
  2. Tokenizer, chat template and the Processor (SPEC §2.3-§2.6)
  3. The synthetic world: scenes, task generators, stage mixtures (SPEC §6.2-§6.4)
  4. JSONL datasets for real data
  5. Tokenizer training for from-scratch runs
  6. Packing, label masks and the DataLoader

This file stands on its own: it imports neither the model nor the kernels.
"""

# =============================================================================
# 1-2. Preprocessing, tokenizer, chat template, Processor
# (section owned by the preprocessing work; keep edits inside these markers)
# =============================================================================

import base64
import datetime
import io
import json
import math
import re
from pathlib import Path

import jinja2
import jinja2.ext
import jinja2.nodes
import numpy as np
import torch
import torch.nn.functional as F
from jinja2.sandbox import ImmutableSandboxedEnvironment
from PIL import Image

# --- 2.0 The built-in chat template (defined first: the from-scratch tokenizer of section 5 saves it) -----
# Qwen2.5-VL's template (SPEC §2.6) with MiMo's default system prompt (the one ms-swift registers for
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

# --- 1.0 Constants (SPEC §2.5, §5) --------------------------------------------------------------------
PATCH_SIZE = 14  # ViT patch side in pixels
TEMPORAL_PATCH_SIZE = 2  # frames per patch; an image is its own frame twice
MERGE_SIZE = 2  # 2x2 patches merge into one LLM token
IMAGE_FACTOR = PATCH_SIZE * MERGE_SIZE  # 28: resized sides are multiples of this
PATCH_DIM = 3 * TEMPORAL_PATCH_SIZE * PATCH_SIZE * PATCH_SIZE  # 1176 values per patch, (c, t, y, x)
MAX_ASPECT_RATIO = 200
IMAGE_MIN_PIXELS = 4 * 28 * 28  # 3136: qwen-vl-utils and the Qwen2.5-VL hub preprocessor_config
IMAGE_MAX_PIXELS = 16384 * 28 * 28  # 12,845,056: the same two, i.e. up to 16384 tokens per image
MIMO_MAX_PIXELS = 4096 * 28 * 28  # 3,211,264: MiMo-VL's evaluation setting (SPEC §2.5), <= 4096 tokens
VIDEO_MIN_PIXELS = 128 * 28 * 28  # per frame
VIDEO_MAX_PIXELS = 768 * 28 * 28  # per frame
VIDEO_TOTAL_PIXELS = 128000 * 28 * 28 * 0.9  # all frames together: 90% of a 128k-token context
FPS = 2.0  # default frame-sampling rate
FRAME_FACTOR = 2  # frame counts are even (= TEMPORAL_PATCH_SIZE)
FPS_MIN_FRAMES = 4
FPS_MAX_FRAMES = 768
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP normalisation, RGB
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
FRAME_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff")


# --- 1.1 smart_resize ---------------------------------------------------------------------------------
def smart_resize(height, width, factor=IMAGE_FACTOR, min_pixels=IMAGE_MIN_PIXELS, max_pixels=IMAGE_MAX_PIXELS):
    """(height, width) -> the (h, w) the model sees: multiples of `factor`, h*w in [min_pixels, max_pixels],
    aspect ratio kept as well as that allows. qwen-vl-utils semantics (SPEC §5.1): the max(factor, .)
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


# --- 1.3 Normalise and patchify (SPEC §4.2) -----------------------------------------------------------
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


# --- 1.4 Videos (SPEC §5.3) ---------------------------------------------------------------------------
# A video reaches the model as frames sampled at `fps` (2 by default), an even number of them, all
# resized to one size chosen from a per-frame pixel budget; consecutive frame pairs form one temporal
# patch. Sources: a decoded (T,H,W,3) uint8 array with its `video_fps`, a video file (needs the
# optional `av` package), or frames that are already sampled: a folder of images or a list of images,
# taken at `sample_fps` (default 2.0, as qwen-vl-utils; its `fps` key does not apply to them).
VIDEO_KEYS = ("fps", "nframes", "min_frames", "max_frames", "video_fps", "sample_fps", "video_start",
              "video_end", "min_pixels", "max_pixels", "total_pixels", "resized_height", "resized_width")


def smart_nframes(total_frames, video_fps, fps=None, nframes=None, min_frames=None, max_frames=None):
    """How many frames to sample (qwen-vl-utils semantics): `nframes` rounded to even, or `fps` frames
    per second of video clamped to [min_frames, max_frames] and to the video, floored to even."""
    if fps is not None and nframes is not None:
        raise ValueError(f"give a video either fps ({fps}) or nframes ({nframes}), not both")
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
            if video_fps is None or video_fps <= 0:
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
def _compile_chat_template(template):
    """Compile a checkpoint's Jinja chat template in a sandbox, with the globals and filters that
    transformers gives templates (raise_exception, strftime_now, a non-escaping tojson, loop controls,
    and the {% generation %} tag, which here simply renders its body)."""

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

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=strftime_now)
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise ValueError(f"the chat template does not parse (line {e.lineno}): {e.message}") from e


def _read_json(path):
    """A checkpoint's JSON file as a dict; {} when the file is absent."""
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e


def _token_text(token):
    """tokenizer_config.json writes a special token as a string or as {"content": ...}."""
    return token["content"] if isinstance(token, dict) else token


def _find_chat_template(folder, tokenizer_config):
    """The checkpoint's own template: chat_template.jinja, chat_template.json, then tokenizer_config.json
    (a string, or a list of named templates); None when it has none."""
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text(encoding="utf-8")
    template = _read_json(folder / "chat_template.json").get("chat_template")
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


# --- 2.2 The Processor --------------------------------------------------------------------------------
# Thinking control (SPEC §2.6). MiMo-VL thinks by default: think=True changes nothing. think=False
# uses one of the documented switches:
#   "prefill": the assistant turn starts with an empty thought "<think>\n</think>\n" (2025-06 models,
#              maintainer-documented and used by MiMo's eval wrapper; deterministic, the default);
#   "suffix":  "\n<no_think>\n" appended to the last user message (2025-06, maintainer-recommended);
#   "slash":   " /no_think" appended to the last user message (the 2508 models).
NO_THINK_PREFILL = "<think>\n</think>\n"
NO_THINK_SUFFIXES = {"suffix": "\n<no_think>\n", "slash": " /no_think"}
_TEMPLATE_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token",
                        "mask_token")


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
    """Conversations -> model inputs with Hugging Face names (SPEC §2.3-§2.6, §4.1).

        processor = Processor.from_pretrained("MiMo-VL-7B-RL")
        batch = processor([{"role": "user", "content": [{"type": "image", "image": "cat.jpg"},
                                                        {"type": "text", "text": "What is this?"}]}])
        # input_ids, attention_mask, pixel_values, image_grid_thw (+ video keys when there are videos)

    `tokenizer` is a `tokenizers.Tokenizer`; the ids of the special tokens are read from it."""

    def __init__(self, tokenizer, chat_template=None, *, image_token="<|image_pad|>", video_token="<|video_pad|>",
                 eos_token="<|im_end|>", pad_token=None, eos_token_ids=None, template_tokens=None,
                 min_pixels=IMAGE_MIN_PIXELS, max_pixels=IMAGE_MAX_PIXELS, no_think_style="prefill"):
        if no_think_style not in ("prefill", *NO_THINK_SUFFIXES):
            raise ValueError(f"no_think_style must be 'prefill', 'suffix' or 'slash', got {no_think_style!r}")
        self.tokenizer = tokenizer
        tokenizer.no_padding()  # the processor pads (left) and never truncates a prompt silently
        tokenizer.no_truncation()
        self.chat_template = chat_template or DEFAULT_CHAT_TEMPLATE
        self._template = _compile_chat_template(self.chat_template)
        self.image_token, self.video_token = image_token, video_token
        self.image_token_id = self._token_id(image_token)
        self.video_token_id = self._token_id(video_token)
        self.vision_start_token_id = tokenizer.token_to_id("<|vision_start|>")
        if pad_token is None:  # Qwen pads with <|endoftext|>
            pad_token = "<|endoftext|>" if tokenizer.token_to_id("<|endoftext|>") is not None else eos_token
        self.pad_token_id = self._token_id(pad_token)
        if eos_token_ids is None:  # stop on <|im_end|>, and on <|endoftext|> defensively (SPEC §2.4)
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
        self.no_think_style = no_think_style

    def _token_id(self, token):
        token_id = self.tokenizer.token_to_id(token)
        if token_id is None:
            raise ValueError(f"the tokenizer has no token {token!r}; a Qwen2.5-VL-style tokenizer needs it")
        return token_id

    @classmethod
    def from_pretrained(cls, path, **kwargs):
        """Load from a checkpoint folder: tokenizer.json, and when present tokenizer_config.json (special
        tokens, template), chat_template.jinja/.json, preprocessor_config.json (pixel budget) and
        generation_config.json (stop tokens). `kwargs` override the constructor's arguments."""
        from tokenizers import Tokenizer

        folder = Path(path)
        if not folder.is_dir():
            raise FileNotFoundError(f"model folder not found: {folder}")
        if not (folder / "tokenizer.json").is_file():
            raise FileNotFoundError(f"{folder / 'tokenizer.json'} not found; download it with the weights")
        tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        config = _read_json(folder / "tokenizer_config.json")
        template_tokens = {k: _token_text(config[k]) for k in _TEMPLATE_TOKEN_KEYS if config.get(k)}
        if config.get("additional_special_tokens"):
            template_tokens["additional_special_tokens"] = [
                _token_text(t) for t in config["additional_special_tokens"]]
        pre_file = folder / "preprocessor_config.json"
        pre = _read_json(pre_file)
        supported = (("patch_size", PATCH_SIZE), ("temporal_patch_size", TEMPORAL_PATCH_SIZE),
                     ("merge_size", MERGE_SIZE))
        for key, value in supported:
            if pre.get(key, value) != value:
                raise ValueError(f"{pre_file}: {key}={pre[key]} is not supported (only {value})")
        for key, value in (("image_mean", CLIP_MEAN), ("image_std", CLIP_STD)):
            if not np.allclose(pre.get(key, value), value, rtol=0, atol=1e-6):
                raise ValueError(f"{pre_file}: {key}={pre[key]} is not supported (only CLIP's {list(value)})")
        size = pre.get("size") or {}
        generation = _read_json(folder / "generation_config.json")
        options = dict(
            eos_token=template_tokens.get("eos_token", "<|im_end|>"),
            pad_token=template_tokens.get("pad_token"),
            eos_token_ids=generation.get("eos_token_id"),
            template_tokens=template_tokens,
            min_pixels=pre.get("min_pixels", size.get("shortest_edge", IMAGE_MIN_PIXELS)),
            max_pixels=pre.get("max_pixels", size.get("longest_edge", IMAGE_MAX_PIXELS)),
        )
        options.update(kwargs)
        if "chat_template" not in options:
            options["chat_template"] = _find_chat_template(folder, config)
        return cls(tokenizer, **options)

    def save_pretrained(self, path):
        """Write tokenizer.json, tokenizer_config.json, chat_template.json and preprocessor_config.json,
        loadable by from_pretrained and by transformers (PreTrainedTokenizerFast, Qwen2VLImageProcessor)."""
        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save(str(folder / "tokenizer.json"))
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
            (folder / name).write_text(json.dumps(content, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")

    # -- text ------------------------------------------------------------------------------------------
    def apply_chat_template(self, conversation, add_generation_prompt=True, think=True, **template_kwargs):
        """One conversation -> the prompt string (vision placeholders not yet expanded)."""
        if not think and self.no_think_style in NO_THINK_SUFFIXES:
            conversation = self._append_to_last_user(conversation, NO_THINK_SUFFIXES[self.no_think_style])
        variables = {**self.template_tokens, **template_kwargs}
        text = self._template.render(messages=conversation, tools=None, documents=None,
                                     add_generation_prompt=add_generation_prompt, **variables)
        if not think and self.no_think_style == "prefill":
            if not add_generation_prompt:
                raise ValueError("think=False with no_think_style='prefill' prefills the assistant turn; "
                                 "it needs add_generation_prompt=True")
            text += NO_THINK_PREFILL
        return text

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
        """A string -> token ids (no placeholder expansion)."""
        return self.tokenizer.encode(text).ids

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
        tokens its grid makes (SPEC §2.6)."""
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
        texts = [self.apply_chat_template(c, add_generation_prompt, think, **template_kwargs) for c in batch]
        out = self.vision_inputs(batch, min_pixels, max_pixels)
        texts = self.expand_vision_tokens(texts, out.get("image_grid_thw"), out.get("video_grid_thw"))
        ids = [e.ids for e in self.tokenizer.encode_batch(texts)]
        length = max(len(x) for x in ids)
        input_ids = torch.full((len(ids), length), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(ids), length), dtype=torch.long)
        for row, x in enumerate(ids):  # left padding: the prompts end together, where generation starts
            input_ids[row, length - len(x):] = torch.tensor(x, dtype=torch.long)
            attention_mask[row, length - len(x):] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask, **out}


# ----- end of section 1-2 -----

# =============================================================================
# 3-6. Synthetic world, JSONL datasets, tokenizer training, packing
# (section owned by the data work; keep edits inside these markers)
# =============================================================================

import hashlib
import json
import os
import random
from dataclasses import asdict, dataclass, replace
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFont

# -----------------------------------------------------------------------------
# 3. The synthetic world
#
# A deterministic, download-free stand-in for every data type of the recipe (SPEC §6.2-§6.4):
# captions, interleaved image-text, OCR, grounding, counting, video with timestamps, long-CoT
# reasoning, text-only reasoning and preference pairs. The design follows what was measured on
# 2 CPU cores (../shared/SMALL-SCALE-NOTES.md): a naive scene keeps a 4 M-parameter model on the
# "no-image plateau" for many minutes, while the following learns in about a minute:
#   * black background, saturated red/green/blue/yellow shapes of >= 18 px;
#   * each object inside one 28-px cell of a grid: one cell = one merged visual token (14-px
#     patches, 2x2 merge), so "what is in this token" is a clean question for the model;
#   * balanced answers (counts uniform over 0..max_count), counting *by colour* among
#     distractors (counting everything is solvable from the total brightness);
#   * grounding with grid-quantised boxes first (`jitter=False`), exact pixels later.
# Coordinates are absolute pixels of the image the model sees, as MiMo-VL uses (SPEC §2.6):
# Qwen JSON `[{"bbox_2d": [x1, y1, x2, y2], "label": ...}]`, x2/y2 exclusive (x2 = x1 + width).
#
# Every sample is a dict {"task": tag, "messages": [HF-style conversation], "answer": ground
# truth, ...}. Images are PIL images, videos (T, H, W, 3) uint8 arrays with their "video_fps".
# Sample `index` of (seed, split, task) is reproducible on its own (no global RNG), so a data
# loader can jump to any position, and train / held-out never share a sample: the split of a
# sample is a hash of its content (10 % held out), and each split keeps only its own
# (make_sample).

CELL = 28  # px; one merged visual token (2 x 14-px patches per side)
COLOURS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "yellow": (255, 255, 0)}
SHAPES = ("circle", "square", "triangle")
GLYPHS = "ABCDEFGHJKLMNPQRSTUVWXYZ0123456789"  # no I/O: too close to 1/0
SPLITS = ("train", "heldout")
HELDOUT_PERCENT = 10


@dataclass(frozen=True)
class Difficulty:
    """Knobs of the synthetic tasks. The defaults are the "learns in minutes on a CPU" setting."""
    image_size: int = 112      # square side in px, a multiple of 28: a (size/28)^2 grid of cells
    object_cells: int = 1      # side of one object's block in cells (2 = a large 48-px shape)
    max_objects: int = 3       # objects per scene (captions, grounding) and distractors (count)
    max_count: int = 4         # counting answers are uniform over 0..max_count
    jitter: bool = False       # False: shapes centred in their block at a fixed size (coarse,
                               # grid-quantised coordinates); True: random size and offset
    text_len: int = 3          # OCR: up to this many characters per image
    reasoning_steps: int = 1   # additions in a chain of thought (visual and text arithmetic)
    cot: bool = True           # arithmetic answers with <think>steps</think> first, or only \boxed{}
    n_images: int = 2          # images per interleaved or multi-image sample
    n_frames: int = 8          # video frames (even, >= 4) ...
    video_fps: int = 2         # ... at this rate: 2 fps, one temporal token group per second

    def __post_init__(self):
        block = CELL * self.object_cells
        if self.image_size % block or self.image_size < block:
            raise ValueError(f"Difficulty.image_size={self.image_size} must be a positive multiple "
                             f"of {block} (28 px x object_cells={self.object_cells})")
        if self.n_frames < 4 or self.n_frames % 2 or self.n_frames % self.video_fps:
            raise ValueError(f"Difficulty.n_frames={self.n_frames} must be even, >= 4 and a "
                             f"multiple of video_fps={self.video_fps} (whole seconds)")

    @property
    def grid(self):  # blocks per side
        return self.image_size // (CELL * self.object_cells)


# ---- scenes: pure data, hashed for the split, rendered only when a sample is kept

@dataclass(frozen=True)
class Obj:
    kind: str           # "circle" | "square" | "triangle" | "glyph"
    colour: str         # a key of COLOURS, or "white" for glyphs
    box: tuple          # (x1, y1, x2, y2) px, x2/y2 exclusive
    char: str = ""      # the character of a glyph

    @property
    def label(self):
        return f"{self.colour} {self.kind}" if self.kind != "glyph" else self.char


@dataclass(frozen=True)
class Scene:
    size: int
    objects: tuple


@dataclass(frozen=True)
class Track:
    """One object of a video: visible from second `start` for len(cells) seconds, in cell
    cells[k] (row, col) during its k-th second."""
    kind: str
    colour: str
    start: int
    cells: tuple

    @property
    def end(self):
        return self.start + len(self.cells)


@dataclass(frozen=True)
class VideoScene:
    size: int
    seconds: int
    fps: int
    tracks: tuple


def _cell_box(row, col, d, rng=None):
    """Pixel box of an object in block (row, col): fixed size and centred unless d.jitter."""
    block = CELL * d.object_cells
    if d.jitter and rng is not None:
        side = rng.randint(max(18, round(0.65 * block)), block - 2)
        ox, oy = rng.randint(0, block - side), rng.randint(0, block - side)
    else:
        side = block - 8
        ox = oy = 4
    x1, y1 = col * block + ox, row * block + oy
    return (x1, y1, x1 + side, y1 + side)


@lru_cache(maxsize=8)
def _font(px):
    # Pillow >= 10.1 ships a scalable default font (FreeType); older builds fall back to a
    # small bitmap font, which still renders deterministically.
    try:
        return ImageFont.load_default(size=px)
    except TypeError:
        return ImageFont.load_default()


def _draw_obj(draw, o):
    x1, y1, x2, y2 = o.box
    fill = COLOURS.get(o.colour, (255, 255, 255))
    if o.kind == "circle":
        draw.ellipse([x1, y1, x2 - 1, y2 - 1], fill=fill)
    elif o.kind == "square":
        draw.rectangle([x1, y1, x2 - 1, y2 - 1], fill=fill)
    elif o.kind == "triangle":
        draw.polygon([(x1, y2 - 1), (x2 - 1, y2 - 1), ((x1 + x2 - 1) / 2, y1)], fill=fill)
    elif o.kind == "glyph":
        draw.text(((x1 + x2) / 2, (y1 + y2) / 2), o.char, fill=fill,
                  font=_font(round(1.25 * (y2 - y1))), anchor="mm")
    else:
        raise ValueError(f"unknown object kind {o.kind!r}")


def render_scene(scene):
    """Scene -> RGB PIL image on black."""
    img = Image.new("RGB", (scene.size, scene.size))
    draw = ImageDraw.Draw(img)
    for o in scene.objects:
        _draw_obj(draw, o)
    return img


def render_video(video):
    """VideoScene -> (T, H, W, 3) uint8 frames, T = seconds * fps."""
    d = Difficulty(image_size=video.size)
    frames = []
    for f in range(video.seconds * video.fps):
        sec = f // video.fps
        objs = [Obj(t.kind, t.colour, _cell_box(*t.cells[sec - t.start], d))
                for t in video.tracks if t.start <= sec < t.end]
        frames.append(np.asarray(render_scene(Scene(video.size, tuple(objs)))))
    return np.stack(frames)


def _mmss(seconds):
    return f"{int(seconds) // 60:02d}:{int(seconds) % 60:02d}"


def _join(words):
    """["a", "b", "c"] -> "a, b and c"."""
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]


def _free_cells(rng, d, n):
    """n distinct random cells (blocks) of the grid."""
    cells = [(r, c) for r in range(d.grid) for c in range(d.grid)]
    if n > len(cells):
        raise ValueError(f"a {d.grid}x{d.grid} grid has no room for {n} more objects; "
                         f"lower max_objects/max_count or raise image_size")
    return rng.sample(cells, n)


def _random_objects(rng, d, n):
    """n shapes at distinct cells, no two of the same colour and shape (so a label names one)."""
    picks = rng.sample([(c, s) for c in COLOURS for s in SHAPES], n)
    return [Obj(s, c, _cell_box(r, col, d, rng))
            for (c, s), (r, col) in zip(picks, _free_cells(rng, d, n))]


def _raster(objs):
    return sorted(objs, key=lambda o: (o.box[1] // CELL, o.box[0] // CELL))


def _caption(objs):
    words = [f"a {o.colour} {o.kind}" for o in _raster(objs)]
    text = _join(words) + "."
    return text[0].upper() + text[1:]


def _user(*items):
    return {"role": "user", "content": [
        {"type": "text", "text": x} if isinstance(x, str) else x for x in items]}


def _assistant(text):
    return {"role": "assistant", "content": text}


# The size is pinned on every item: the answers are in pixels of exactly this image, whatever
# pixel budget the Processor would otherwise apply (for videos, a per-frame minimum of 128 tokens).
def _image(scene):
    return {"type": "image", "image": scene, "resized_height": scene.size,
            "resized_width": scene.size}


def _video(video):
    return {"type": "video", "video": video, "video_fps": float(video.fps), "fps": float(video.fps),
            "resized_height": video.size, "resized_width": video.size}


def _conv(user, answer_text):
    # no system message: the chat template inserts its default one, at training as at inference
    return [user, _assistant(answer_text)]


# ---- task generators: (rng, Difficulty) -> sample with Scene / VideoScene placeholders

def task_caption(rng, d):
    objs = _random_objects(rng, d, rng.randint(1, d.max_objects))
    text = _caption(objs)
    return {"messages": _conv(_user(_image(Scene(d.image_size, tuple(objs))),
                                    "Describe the image."), text), "answer": text}


def task_interleaved(rng, d):
    """Image-text interleaving as a multi-turn chat: every reply depends on the latest image,
    and every reply carries loss (labels on all assistant turns)."""
    msgs, answers = [], []
    for i in range(d.n_images):
        objs = _random_objects(rng, d, rng.randint(1, d.max_objects))
        q = "Describe the image." if i == 0 else "And this one?"
        answers.append(_caption(objs))
        msgs += [_user(_image(Scene(d.image_size, tuple(objs))), q), _assistant(answers[-1])]
    return {"messages": msgs, "answer": answers}


def _count_scene(rng, d, colour, k):
    """k shapes of `colour` plus 1..max_objects distractors of other colours."""
    others = [c for c in COLOURS if c != colour]
    n_distract = rng.randint(1, d.max_objects)
    cells = _free_cells(rng, d, k + n_distract)
    objs = [Obj(rng.choice(SHAPES), colour if i < k else rng.choice(others),
                _cell_box(r, c, d, rng)) for i, (r, c) in enumerate(cells)]
    return Scene(d.image_size, tuple(_raster(objs)))


def task_count(rng, d):
    colour, k = rng.choice(list(COLOURS)), rng.randint(0, d.max_count)
    scene = _count_scene(rng, d, colour, k)
    return {"messages": _conv(_user(_image(scene), f"How many {colour} shapes are there?"),
                              str(k)),
            "answer": str(k), "reward": "count"}


def _ground_scene(rng, d):
    objs = _random_objects(rng, d, rng.randint(1, d.max_objects))
    return Scene(d.image_size, tuple(objs)), rng.choice(objs)


def task_ground_box(rng, d):
    scene, target = _ground_scene(rng, d)
    box = list(target.box)
    text = json.dumps([{"bbox_2d": box, "label": target.label}])
    q = f"Locate the {target.label} and output its bbox_2d coordinates in JSON."
    return {"messages": _conv(_user(_image(scene), q), text), "answer": box,
            "label": target.label, "reward": "giou"}


def task_ground_point(rng, d):
    scene, target = _ground_scene(rng, d)
    x1, y1, x2, y2 = target.box
    point = [(x1 + x2) // 2, (y1 + y2) // 2]
    text = json.dumps([{"point_2d": point, "label": target.label}])
    q = f"Point to the {target.label} and output its point_2d coordinates in JSON."
    return {"messages": _conv(_user(_image(scene), q), text), "answer": list(target.box),
            "point": point, "label": target.label, "reward": "point_in_box"}


def task_ocr(rng, d):
    n = rng.randint(1, d.text_len)
    chars = [rng.choice(GLYPHS) for _ in range(n)]
    # one glyph per cell, read in raster order (left to right, then top to bottom)
    cells = sorted(_free_cells(rng, d, n))
    objs = tuple(Obj("glyph", "white", _cell_box(r, c, d, rng), ch)
                 for ch, (r, c) in zip(chars, cells))
    text = "".join(chars)
    return {"messages": _conv(_user(_image(Scene(d.image_size, objs)),
                                    "What text is written in the image?"), text),
            "answer": text, "reward": "ocr"}


def _reasoned(steps, total, cot=True):
    """A chain of thought, then the answer in \\boxed{} (SPEC §6.4); cot=False keeps only the
    answer (the "no reasoning data" ablation)."""
    thought = "<think>\n" + "\n".join(steps) + "\n</think>\n" if cot else ""
    return thought + f"\\boxed{{{total}}}"


def _sum_cot(numbers, intro, cot=True):
    steps, total = [intro], numbers[0]
    for x in numbers[1:]:
        steps.append(f"{total} + {x} = {total + x}")
        total += x
    return _reasoned(steps, total, cot), total


def task_visual_math(rng, d):
    n = d.reasoning_steps + 1
    numbers = [rng.randint(1, 9) for _ in range(n)]
    cells = sorted(_free_cells(rng, d, n))
    objs = tuple(Obj("glyph", "white", _cell_box(r, c, d, rng), str(x))
                 for x, (r, c) in zip(numbers, cells))
    text, total = _sum_cot(numbers, f"The numbers are {_join([str(x) for x in numbers])}.", d.cot)
    q = "What is the sum of the numbers in the image?"
    return {"messages": _conv(_user(_image(Scene(d.image_size, objs)), q), text),
            "answer": str(total), "reward": "math"}


def task_compare(rng, d):
    colour = rng.choice(list(COLOURS))
    a, b = rng.sample(range(0, d.max_count + 1), 2)  # ordered pair: P(a > b) = 1/2
    s1, s2 = _count_scene(rng, d, colour, a), _count_scene(rng, d, colour, b)
    ans = "1" if a > b else "2"
    q = f"Which image has more {colour} shapes? Answer 1 or 2."
    return {"messages": _conv(_user("Image 1:", _image(s1), "Image 2:", _image(s2), q), ans),
            "answer": ans, "reward": "choice"}


def _walk(rng, d, start, seconds, busy):
    """Cells of a moving object for each of its seconds: a step to a random neighbouring cell
    each second, avoiding the cells `busy` (second -> cells) with other objects."""
    cells = []
    for s in range(start, start + seconds):
        free = [(r, c) for r in range(d.grid) for c in range(d.grid) if (r, c) not in busy.get(s, ())]
        if cells:
            r0, c0 = cells[-1]
            free = [(r, c) for r, c in free if abs(r - r0) + abs(c - c0) == 1] or free
        cells.append(rng.choice(free))
        busy.setdefault(s, set()).add(cells[-1])
    return tuple(cells)


def task_video_grounding(rng, d):
    secs = d.n_frames // d.video_fps
    kinds = rng.sample([(c, s) for c in COLOURS for s in SHAPES], rng.randint(1, d.max_objects))
    busy, tracks = {}, []
    for colour, shape in kinds:
        start = rng.randint(0, secs - 1)
        dur = rng.randint(1, secs - start)
        tracks.append(Track(shape, colour, start, _walk(rng, d, start, dur, busy)))
    target = tracks[0]
    video = VideoScene(d.image_size, secs, d.video_fps, tuple(tracks))
    ans = f"[{_mmss(target.start)},{_mmss(target.end)}]"
    q = (f"When is the {target.colour} {target.kind} visible in the video? "
         f"Answer as [mm:ss,mm:ss].")
    return {"messages": _conv(_user(_video(video), q), ans),
            "answer": [target.start, target.end], "reward": "tiou"}


def task_video_count(rng, d):
    """Counting over time: shapes come and go (each in its own cell); count how many of one
    colour appeared."""
    secs = d.n_frames // d.video_fps
    colour = rng.choice(list(COLOURS))
    k = rng.randint(0, min(d.max_count, secs))
    others = [c for c in COLOURS if c != colour]
    tracks = []
    for i, cell in enumerate(_free_cells(rng, d, k + rng.randint(1, d.max_objects))):
        start = rng.randint(0, secs - 1)
        tracks.append(Track(rng.choice(SHAPES), colour if i < k else rng.choice(others), start,
                            (cell,) * rng.randint(1, min(2, secs - start))))
    tracks.sort(key=lambda t: (t.start, t.cells))
    video = VideoScene(d.image_size, secs, d.video_fps, tuple(tracks))
    q = f"How many {colour} shapes appear in the video?"
    return {"messages": _conv(_user(_video(video), q), str(k)), "answer": str(k),
            "reward": "count"}


NAMES = ("Ada", "Ben", "Cleo", "Dan", "Eve", "Finn", "Gus", "Hana", "Ivo", "Jun")
ITEMS = ("apples", "coins", "stamps", "shells", "marbles", "books", "cards", "pens")


def _word_problem(rng, d):
    """A story with reasoning_steps gains and losses; never goes below zero."""
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    total = rng.randint(2, 20)
    story, steps = [f"{name} has {total} {item}."], []
    for _ in range(d.reasoning_steps):
        if total > 1 and rng.random() < 0.5:
            x = rng.randint(1, total - 1)
            story.append(f"{name} gives away {x}.")
            steps.append(f"{total} - {x} = {total - x}")
            total -= x
        else:
            x = rng.randint(1, 20)
            story.append(f"{name} gets {x} more.")
            steps.append(f"{total} + {x} = {total + x}")
            total += x
    q = " ".join(story) + f" How many {item} does {name} have now?"
    return q, _reasoned(steps, total, d.cot), total


def task_text_math(rng, d):
    q, cot, total = _word_problem(rng, d)
    return {"messages": _conv(_user(q), cot), "answer": str(total), "reward": "math"}


def task_preference(rng, d):
    """A prompt with a chosen (correct) and a rejected (plausible but wrong) response, for the
    Bradley-Terry reward model (SPEC §6.4)."""
    kind = rng.choice(["count", "caption", "text_math"])
    if kind == "count":
        s = task_count(rng, d)
        k = int(s["answer"])
        rejected = str(rng.choice([x for x in range(d.max_count + 1) if x != k]))
    elif kind == "caption":
        s = task_caption(rng, d)
        scene = s["messages"][0]["content"][0]["image"]
        wrong = [replace(o, colour=rng.choice([c for c in COLOURS if c != o.colour]))
                 for o in scene.objects]
        rejected = _caption(wrong)
    else:
        s = task_text_math(rng, d)
        total = int(s["answer"])
        wrong = total + rng.choice([-2, -1, 1, 2])
        rejected = s["messages"][-1]["content"].replace(f"\\boxed{{{total}}}",
                                                        f"\\boxed{{{wrong}}}")
    chosen = s["messages"][-1]["content"]
    return {"messages": s["messages"][:-1], "chosen": chosen, "rejected": rejected,
            "answer": chosen, "source_task": kind, "reward": "reward_model"}


def preference_conversations(sample):
    """A preference sample -> (chosen, rejected): the prompt completed by each response, as
    samples that encode_sample (section 6) takes."""
    return tuple({**sample, "messages": sample["messages"] + [_assistant(sample[key])]}
                 for key in ("chosen", "rejected"))


# text-only counterparts of the visual tasks: the stage-0 LM learns the chat format and the
# answer styles from these, so that stage 1 can freeze it (SPEC §6.3)
def _describe_in_text(objs):
    return " ".join(f"There is a {o.colour} {o.kind} at row {o.box[1] // CELL + 1}, "
                    f"column {o.box[0] // CELL + 1}." for o in _raster(objs))


def task_text_scene(rng, d):
    objs = _random_objects(rng, d, rng.randint(1, d.max_objects))
    kind = rng.choice(["caption", "count", "box"])
    desc = _describe_in_text(objs)
    if kind == "caption":
        q, a = "Describe the scene in one sentence.", _caption(objs)
    elif kind == "count":
        colour = rng.choice(list(COLOURS))
        q, a = f"How many {colour} shapes are there?", str(sum(o.colour == colour for o in objs))
    else:
        o = rng.choice(objs)
        q = f"Locate the {o.label} and output its bbox_2d coordinates in JSON."
        a = json.dumps([{"bbox_2d": list(o.box), "label": o.label}])
    return {"messages": _conv(_user(f"{desc} {q}"), a), "answer": a}


def task_text(rng, d):
    """A plain-text document for language-model pre-training (stage 0, long text in stage 4):
    every token carries loss. It states facts in the formats the later tasks answer in."""
    parts = []
    for _ in range(rng.randint(2, 4 + 2 * d.reasoning_steps)):
        kind = rng.choice(["scene", "boxes", "story", "sum", "time", "text"])
        if kind == "scene":
            objs = _random_objects(rng, d, rng.randint(1, d.max_objects))
            parts.append(_describe_in_text(objs) + " " + _caption(objs))
        elif kind == "boxes":
            o = _random_objects(rng, d, 1)[0]
            parts.append(f"The {o.label} is at {json.dumps(list(o.box))}. " +
                         json.dumps([{"bbox_2d": list(o.box), "label": o.label}]))
        elif kind == "story":
            q, cot, _ = _word_problem(rng, d)
            parts.append(q + " " + cot)
        elif kind == "sum":
            nums = [rng.randint(1, 9) for _ in range(d.reasoning_steps + 1)]
            parts.append(_sum_cot(nums, f"Add {_join([str(x) for x in nums])}.")[0])
        elif kind == "time":
            a = rng.randint(0, 59)
            b = rng.randint(a + 1, 60)
            c, s = rng.choice(list(COLOURS)), rng.choice(SHAPES)
            parts.append(f"The {c} {s} is visible from {_mmss(a)} to {_mmss(b)}: "
                         f"[{_mmss(a)},{_mmss(b)}].")
        else:
            word = "".join(rng.choice(GLYPHS) for _ in range(rng.randint(1, 6)))
            parts.append(f"The sign reads {word}.")
    return {"text": "\n".join(parts), "answer": None}


TASKS = {
    "caption": task_caption, "interleaved": task_interleaved, "count": task_count,
    "ground_box": task_ground_box, "ground_point": task_ground_point, "ocr": task_ocr,
    "visual_math": task_visual_math, "compare": task_compare,
    "video_grounding": task_video_grounding, "video_count": task_video_count,
    "text_math": task_text_math, "text_scene": task_text_scene, "text": task_text,
    "preference": task_preference,
}


# ---- determinism, splits, rendering

def _canonical(sample):
    """Canonical JSON of a sample before rendering (scenes as their object lists)."""
    def default(x):
        if isinstance(x, (Scene, VideoScene, Obj, Track)):
            return {"_": type(x).__name__, **asdict(x)}
        raise TypeError(f"cannot serialise {type(x).__name__}")
    return json.dumps(sample, default=default, sort_keys=True)


def split_of(sample):
    """'heldout' for HELDOUT_PERCENT % of all possible samples (by content), else 'train'."""
    h = int.from_bytes(hashlib.sha256(_canonical(sample).encode()).digest()[:8], "big")
    return "heldout" if h % 100 < HELDOUT_PERCENT else "train"


def _render(x):
    """Replace Scene / VideoScene placeholders by pixels, recursively."""
    if isinstance(x, Scene):
        return render_scene(x)
    if isinstance(x, VideoScene):
        return render_video(x)
    if isinstance(x, dict):
        return {k: _render(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_render(v) for v in x]
    return x


def make_sample(task, index, split="train", seed=0, difficulty=None, render=True):
    """Sample `index` of `task` in `split`: the same arguments always give the same sample,
    byte for byte. Candidates are drawn until one falls in the requested split (about 1.1
    draws for train, 10 for held-out), so no sample can appear in both splits."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose from {sorted(TASKS)}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose from {SPLITS}")
    d = difficulty or Difficulty()
    for attempt in range(1000):
        rng = random.Random(f"{seed}/{split}/{task}/{index}/{attempt}")
        s = TASKS[task](rng, d)
        if split_of(s) == split:
            s = {"task": task, **s}
            return _render(s) if render else s
    raise RuntimeError(f"task {task!r} at {d} has too few distinct samples to fill the "
                       f"{split!r} split; raise max_objects or image_size")


# ---- the image set for pre-training the ViT (stage 0): one label per cell

CELL_CLASSES = (["empty"] + [f"{c} {s}" for c in COLOURS for s in SHAPES]
                + [f"glyph {g}" for g in GLYPHS])


def classification_sample(index, split="train", seed=0, difficulty=None):
    """A scene of shapes and glyphs with the class of every cell: `cell_labels[r * grid + c]`
    indexes CELL_CLASSES (0 = empty). With 28-px cells a cell is exactly one merged visual
    token, so a linear head on the ViT's merged tokens (raster order) is a dense classifier —
    it teaches the ViT colour, shape and glyphs at every position, which every later task uses."""
    d = replace(difficulty or Difficulty(), object_cells=1, jitter=True)
    for attempt in range(1000):
        rng = random.Random(f"{seed}/{split}/classify/{index}/{attempt}")
        n = rng.randint(1, d.grid * d.grid // 2)
        objs = []
        for r, c in _free_cells(rng, d, n):
            if rng.random() < 0.7:
                objs.append(Obj(rng.choice(SHAPES), rng.choice(list(COLOURS)), _cell_box(r, c, d, rng)))
            else:
                objs.append(Obj("glyph", "white", _cell_box(r, c, d, rng), rng.choice(GLYPHS)))
        scene = Scene(d.image_size, tuple(_raster(objs)))
        if split_of({"classify": scene}) != split:
            continue
        labels = [0] * (d.grid * d.grid)
        for o in objs:
            name = f"glyph {o.char}" if o.kind == "glyph" else o.label
            labels[(o.box[1] // CELL) * d.grid + o.box[0] // CELL] = CELL_CLASSES.index(name)
        return {"task": "classify", "image": render_scene(scene), "cell_labels": labels}
    raise RuntimeError("unreachable: the classification scene space is large")


def classification_batch(indices, split="train", seed=0, difficulty=None):
    """Classification samples -> ViT inputs: pixel_values, image_grid_thw, and labels (one per
    merged token, images in order, each in raster order: what the merger outputs)."""
    samples = [classification_sample(i, split, seed, difficulty) for i in indices]
    pixels = [preprocess_image(s["image"]) for s in samples]
    return {"pixel_values": torch.cat([p for p, _ in pixels]),
            "image_grid_thw": torch.tensor([g for _, g in pixels], dtype=torch.long),
            "labels": torch.tensor([c for s in samples for c in s["cell_labels"]], dtype=torch.long)}


# ---- stage mixtures (SPEC §6.3) and RL prompt sets (SPEC §6.4)

@dataclass(frozen=True)
class MixItem:
    task: str
    weight: float
    difficulty: Difficulty = Difficulty()


BIG_SHAPE = Difficulty(object_cells=2, max_objects=1)          # the easiest perception task
LARGE = Difficulty(image_size=224, max_objects=6)              # > one 112-px window: exercises
                                                               # the ViT's window attention
LONG = Difficulty(reasoning_steps=4, n_images=4, n_frames=16)  # stage-4 long context

# Weights are relative. The measured lessons (../shared/SMALL-SCALE-NOTES.md): one easy task
# first, then add tasks stage by stage, weight the hard ones (grounding, sums) heavily and keep
# replaying the earlier ones so a switch does not erase them.
STAGE_MIXTURES = {
    # 0: LM pre-training on text only (the chat format and every answer style)
    0: [MixItem("text", 0.4), MixItem("text_scene", 0.4), MixItem("text_math", 0.2)],
    # 1: projector warm-up on captions (the paper: image-caption pairs)
    1: [MixItem("caption", 0.6, BIG_SHAPE), MixItem("caption", 0.4)],
    # 2: + interleaved image-text
    2: [MixItem("caption", 0.2, BIG_SHAPE), MixItem("caption", 0.3), MixItem("interleaved", 0.5)],
    # 3: + OCR, grounding, video, counting, some reasoning and text-only data
    3: [MixItem("caption", 0.04), MixItem("interleaved", 0.04), MixItem("count", 0.14),
        MixItem("ground_box", 0.14), MixItem("ground_point", 0.06), MixItem("ocr", 0.10),
        MixItem("visual_math", 0.10), MixItem("compare", 0.05),
        MixItem("video_grounding", 0.10), MixItem("video_count", 0.05),
        MixItem("text_math", 0.04), MixItem("text", 0.02), MixItem("count", 0.04, LARGE),
        MixItem("ground_box", 0.02, LARGE)],
    # 4: long context: more images per sample, longer videos, larger images, long reasoning
    4: [MixItem("caption", 0.03), MixItem("interleaved", 0.05, LONG), MixItem("count", 0.08),
        MixItem("count", 0.04, LARGE), MixItem("ground_box", 0.10), MixItem("ground_box", 0.04, LARGE),
        MixItem("ground_point", 0.04), MixItem("ocr", 0.06), MixItem("compare", 0.04),
        MixItem("video_grounding", 0.06), MixItem("video_grounding", 0.04, LONG),
        MixItem("video_count", 0.04), MixItem("visual_math", 0.12),
        MixItem("visual_math", 0.10, LONG), MixItem("text_math", 0.06),
        MixItem("text_math", 0.06, LONG), MixItem("text", 0.04, LONG)],
}
REASONING_TASKS = ("visual_math", "text_math")


def stage_mixture(stage, reasoning_data=True):
    """The mixture of a stage. reasoning_data=False keeps the arithmetic tasks but without
    their chains of thought (answer only): the ablation of the paper's finding that long-CoT
    data in late pre-training helps reasoning (SPEC §6.3)."""
    if stage not in STAGE_MIXTURES:
        raise ValueError(f"unknown stage {stage!r}; choose from {sorted(STAGE_MIXTURES)}")
    mix = STAGE_MIXTURES[stage]
    if not reasoning_data:
        mix = [replace(m, difficulty=replace(m.difficulty, cot=False))
               if m.task in REASONING_TASKS else m for m in mix]
    return mix


class SyntheticDataset:
    """An endless, map-style view of a mixture: item i is a deterministic sample whose task is
    drawn by weight from (seed, split, i). Indexing is random-access, so a loader can start at
    any position and workers need no shared state."""

    def __init__(self, mixture, split="train", seed=0):
        if isinstance(mixture, int):
            mixture = stage_mixture(mixture)
        self.mixture, self.split, self.seed = list(mixture), split, seed
        for m in self.mixture:
            if m.task not in TASKS:
                raise ValueError(f"unknown task {m.task!r} in mixture; choose from {sorted(TASKS)}")
        self._cum = np.cumsum([m.weight for m in self.mixture]).tolist()

    def __getitem__(self, i):
        u = random.Random(f"{self.seed}/{self.split}/mix/{i}").random() * self._cum[-1]
        m = self.mixture[min(np.searchsorted(self._cum, u, side="right"), len(self.mixture) - 1)]
        return make_sample(m.task, i, self.split, self.seed, m.difficulty)


RL_TASKS = ("count", "ground_box", "ground_point", "ocr", "visual_math", "text_math",
            "video_grounding", "video_count", "caption")


def rl_prompts(n, split="train", seed=0, tasks=RL_TASKS, difficulty=None):
    """n RL prompts, tasks in turn: {"task", "messages" (ending with the user turn), "answer",
    "reward"}. `reward` names what the reward router should use: count, giou, point_in_box,
    ocr, math, tiou, choice or reward_model (captions: open-ended, scored by the reward model)."""
    return [rl_prompt(tasks[i % len(tasks)], i // len(tasks), split, seed, difficulty)
            for i in range(n)]


def rl_prompt(task, index, split="train", seed=0, difficulty=None):
    """Sample `index` of `task` as an RL prompt: the conversation without the answer turn."""
    s = make_sample(task, index, split, seed, difficulty)
    s["messages"] = s["messages"][:-1]
    s.setdefault("reward", "reward_model")
    return s


# -----------------------------------------------------------------------------
# 4. JSONL datasets for real data
#
# Format: UTF-8, one JSON object per line (blank lines are ignored), either a conversation
#
#   {"messages": [{"role": "system"|"user"|"assistant", "content": "text" or [items]}, ...],
#    "task": "count", "answer": "3"}            <- task / answer optional (evaluation, RL)
#
# with items {"type": "text", "text": "..."}, {"type": "image", "image": "img/a.png"} and
# {"type": "video", "video": "clip.mp4" | "frames_dir" | ["f0.png", "f1.png", ...]}, paths
# relative to the JSONL file's folder (absolute paths also work): the message shape the Processor
# and the synthetic world use. Other keys of an item go to the preprocessing (section 1), e.g.
# "max_pixels" or "resized_height"/"resized_width"; "sample_fps" (default 2) is the rate at which
# a folder or list of frames was taken, "fps" the rate to sample a video file at. A line may
# instead hold a plain-text document for language modelling
#
#   {"text": "a document; every token carries loss"}
#
# data/example.jsonl is a small example. Lines are parsed and their images opened only when
# read, so a file of any size streams in constant memory.

class DataError(ValueError):
    """A problem with a user's data file, naming the file and the line."""


JSONL_ROLES = ("system", "user", "assistant")


class JsonlDataset:
    """Conversations from a JSONL file. Iterate to stream it lazily, or index it: the first
    len() / [i] scans the file once for line offsets (no parsing).

    on_error="raise" (default) stops at the first bad line with a DataError naming file and
    line; on_error="skip" drops bad lines and counts them in `.skipped` (and `.errors`)."""

    def __init__(self, path, on_error="raise"):
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', not {on_error!r}")
        self.path = os.path.abspath(path)
        if not os.path.isfile(self.path):
            raise DataError(f"{path}: JSONL file not found")
        self.root, self.on_error = os.path.dirname(self.path), on_error
        self.skipped, self.errors = 0, []
        self._offsets = None  # byte offset and line number of every non-blank line

    def _index(self):
        if self._offsets is None:
            self._offsets, pos = [], 0
            with open(self.path, "rb") as f:
                for lineno, raw in enumerate(f, 1):
                    if raw.strip():
                        self._offsets.append((pos, lineno))
                    pos += len(raw)
        return self._offsets

    def __len__(self):
        return len(self._index())

    def __getitem__(self, i):
        """Sample i (0-based over non-blank lines), or None if it is bad and on_error='skip'."""
        pos, lineno = self._index()[i]
        with open(self.path, "rb") as f:
            f.seek(pos)
            raw = f.readline()
        return self._parse_or_skip(raw, lineno)

    def __iter__(self):
        with open(self.path, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                if raw.strip():
                    s = self._parse_or_skip(raw, lineno)
                    if s is not None:
                        yield s

    def _parse_or_skip(self, raw, lineno):
        try:
            return self._parse(raw, lineno)
        except DataError as e:
            if self.on_error == "raise":
                raise
            self.skipped += 1
            self.errors.append(str(e))
            return None

    def _fail(self, lineno, msg):
        raise DataError(f"{self.path}:{lineno}: {msg}")

    def _parse(self, raw, lineno):
        try:
            obj = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            self._fail(lineno, f"malformed line, not valid JSON ({e}); expected one JSON object "
                               f"per line")
        if not isinstance(obj, dict):
            self._fail(lineno, f"expected a JSON object, got {type(obj).__name__}")
        if "messages" not in obj:
            if isinstance(obj.get("text"), str):
                return {"task": obj.get("task", "text"), "text": obj["text"],
                        "answer": obj.get("answer"), "source": f"{self.path}:{lineno}"}
            self._fail(lineno, "expected a 'messages' list (a conversation) or a 'text' string")
        msgs = obj["messages"]
        if not isinstance(msgs, list) or not msgs:
            self._fail(lineno, "'messages' must be a non-empty list")
        out = []
        for k, m in enumerate(msgs):
            if not isinstance(m, dict) or m.get("role") not in JSONL_ROLES:
                self._fail(lineno, f"message {k}: expected {{'role': one of {JSONL_ROLES}, "
                                   f"'content': ...}}, got {json.dumps(m)[:80]}")
            content = m.get("content")
            if isinstance(content, str):
                out.append({"role": m["role"], "content": content})
            elif isinstance(content, list):
                out.append({"role": m["role"],
                            "content": [self._item(it, lineno, k) for it in content]})
            else:
                self._fail(lineno, f"message {k}: 'content' must be a string or a list of items")
        sample = {key: v for key, v in obj.items() if key != "messages"}
        sample.setdefault("task", "jsonl")
        sample.setdefault("answer", None)
        return {**sample, "messages": out, "source": f"{self.path}:{lineno}"}

    def _path(self, p, lineno, k, what):
        if not isinstance(p, str) or not p:
            self._fail(lineno, f"message {k}: {what} must be a path string, got {p!r}")
        full = p if os.path.isabs(p) else os.path.join(self.root, p)
        if not os.path.exists(full):
            self._fail(lineno, f"message {k}: {what} file not found: {p!r} (looked for "
                               f"{full}; relative paths start at the JSONL file's folder)")
        return full

    def _item(self, it, lineno, k):
        kind = it.get("type") if isinstance(it, dict) else None
        if kind == "text":
            if not isinstance(it.get("text"), str):
                self._fail(lineno, f"message {k}: a text item needs a 'text' string")
            return {"type": "text", "text": it["text"]}
        if kind == "image":  # opened now, so a bad file is reported with its line
            path = self._path(it.get("image"), lineno, k, "image")
            try:
                return {**it, "image": load_image(path)}
            except (OSError, ValueError) as e:
                self._fail(lineno, f"message {k}: {e}")
        if kind == "video":  # checked now, decoded by the Processor (section 1)
            v = it.get("video")
            if isinstance(v, list):
                if not v:
                    self._fail(lineno, f"message {k}: a video frame list is empty")
                return {**it, "video": [self._path(p, lineno, k, "video frame") for p in v]}
            return {**it, "video": self._path(v, lineno, k, "video")}
        self._fail(lineno, f"message {k}: unknown item type {kind!r} in "
                           f"{json.dumps(it)[:80]}; use 'text', 'image' or 'video'")


# -----------------------------------------------------------------------------
# 5. Tokenizer training for from-scratch runs
#
# A byte-level BPE like Qwen2's (same pre-tokenizer regex, so digits are split one by one —
# which is what makes arithmetic learnable), trained with `tokenizers` on the synthetic corpus.
# The special tokens sit at the fixed ids of the tiny preset (0-9; the official ones are
# 151643...); <think> and </think> are added tokens but not *special* ones, like MiMo's
# (decoding with skip_special_tokens keeps them, SPEC §2.3).

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>",
                  "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
                  "<think>", "</think>")
NOT_SPECIAL = ("<think>", "</think>")
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+"
               r"[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def tokenizer_corpus(n_samples=4000, seed=0):
    """Texts for BPE training: the text side of every synthetic task (train split) plus the
    chat template's fixed words. Special tokens are left out: they are never merged."""
    tasks = sorted(TASKS)
    for i in range(n_samples):
        s = make_sample(tasks[i % len(tasks)], i, "train", seed, render=False)
        if "text" in s:
            yield s["text"]
            continue
        parts = []
        parts.append("system\n" + DEFAULT_SYSTEM_PROMPT)
        for m in s["messages"] + [{"role": "assistant", "content": s.get("rejected", "")}]:
            content = m["content"]
            texts = [content] if isinstance(content, str) else [
                it["text"] for it in content if it["type"] == "text"]
            parts.append(m["role"] + "\n" + "".join(texts))
        yield "\n".join(parts)


def train_tokenizer(out_dir, vocab_size=1024, n_samples=4000, seed=0):
    """Train the BPE and save it to out_dir with the files of a checkpoint's processor, so that
    Processor.from_pretrained(out_dir) and transformers' AutoTokenizer / PreTrainedTokenizerFast
    both load it. Deterministic for given arguments. vocab_size is an upper bound: the synthetic
    corpus has few distinct words, and BPE stops when no pair repeats (~650 tokens)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers
    from tokenizers import pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    # the trainer puts its special tokens first, in order: exactly ids 0..9
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, show_progress=False,
        special_tokens=[AddedToken(t, special=t not in NOT_SPECIAL, normalized=False)
                        for t in SPECIAL_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(tokenizer_corpus(n_samples, seed), trainer)
    # the trainer marks all of them special; <think>/</think> must be plain added tokens
    spec = json.loads(tok.to_str())
    for t in spec["added_tokens"]:
        t["special"] = t["content"] not in NOT_SPECIAL
    tok = Tokenizer.from_str(json.dumps(spec))
    for i, t in enumerate(SPECIAL_TOKENS):
        if tok.token_to_id(t) != i:
            raise RuntimeError(f"tokenizer training put {t} at id {tok.token_to_id(t)}, not {i}")

    # saved the way the Processor saves itself: tokenizer.json, tokenizer_config.json,
    # chat_template.json (DEFAULT_CHAT_TEMPLATE) and preprocessor_config.json
    Processor(tok).save_pretrained(out_dir)
    return out_dir


# -----------------------------------------------------------------------------
# 6. Packing, label masks and the DataLoader
#
# Training rows are *packed*: several samples back to back in one (1, T) row, T <= max_tokens,
# with `cu_seqlens` marking where each starts. The model attends within a sample only and
# restarts its M-RoPE positions at every boundary, so a packed row computes exactly what the
# samples would alone (tested) without any padding. Images and videos of a row are given in
# order of appearance with their grids, as the model expects. Labels (HF convention: aligned
# with input_ids, shifted inside the model) are the assistant replies and their <|im_end|>;
# system, user, vision and padding tokens are -100, and so is the first token of every sample,
# so no sample is ever trained to predict the next one's start. Plain-text documents
# ({"text": ...}) carry labels on every token and end with <|endoftext|>.

IGNORE_INDEX = -100


def assistant_label_mask(input_ids, tokenizer):
    """(L,) bool: True on the tokens of every assistant reply and its closing <|im_end|>, i.e.
    between "<|im_start|>assistant\\n" and the next <|im_end|> (SPEC §2.6 template)."""
    im_start, im_end = tokenizer.token_to_id("<|im_start|>"), tokenizer.token_to_id("<|im_end|>")
    ids = input_ids.tolist()
    mask = [False] * len(ids)
    i = 0
    while i < len(ids):
        if ids[i] != im_start:
            i += 1
            continue
        # read the role header "assistant\n" token by token (robust to merges at the boundary)
        j, header = i + 1, ""
        while j < len(ids) and len(header) < len("assistant\n") and ids[j] not in (im_start, im_end):
            header += tokenizer.decode([ids[j]], skip_special_tokens=False)
            j += 1
        if not header.startswith("assistant\n"):
            i = j
            continue
        while j < len(ids) and ids[j] != im_start:
            mask[j] = True
            if ids[j] == im_end:
                break
            j += 1
        i = j + 1
    return torch.tensor(mask, dtype=torch.bool)


def encode_sample(sample, processor):
    """One sample -> {"input_ids" (L,), "labels" (L,), pixel tensors and grids, "task"}.
    Conversations are rendered by the Processor (chat template, placeholder expansion,
    image/video preprocessing); text documents are tokenised whole."""
    tok = processor.tokenizer
    if "messages" not in sample:
        ids = torch.tensor(tok.encode(sample["text"], add_special_tokens=False).ids
                           + [tok.token_to_id("<|endoftext|>")])
        labels = ids.clone()
        enc = {}
    else:
        enc = processor([sample["messages"]], add_generation_prompt=False)
        ids = enc["input_ids"][0]
        labels = torch.where(assistant_label_mask(ids, tok), ids, IGNORE_INDEX)
    labels[0] = IGNORE_INDEX
    out = {"input_ids": ids, "labels": labels, "task": sample.get("task", "")}
    for key in ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw",
                "second_per_grid_ts"):
        if enc.get(key) is not None:
            out[key] = enc[key]
    return out


def best_fit_pack(lengths, max_tokens):
    """Best-fit decreasing bin packing: take samples longest first and put each into the open
    row with the least room left that still fits it (a new row if none does). Returns rows as
    lists of sample indices, each in the samples' original order."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows, room = [], []
    for i in order:
        if lengths[i] > max_tokens:
            raise ValueError(f"sample of {lengths[i]} tokens does not fit a row of {max_tokens}")
        fits = [r for r in range(len(rows)) if room[r] >= lengths[i]]
        if fits:
            r = min(fits, key=lambda r: (room[r], r))
        else:
            r = len(rows)
            rows.append([])
            room.append(max_tokens)
        rows[r].append(i)
        room[r] -= lengths[i]
    return [sorted(r) for r in rows]


def collate_packed(encoded, pad_to=None, pad_id=0):
    """Concatenate encoded samples into one packed row: input_ids/labels (1, T), cu_seqlens
    int32 (n + 1,), pixel tensors and grids in order of appearance. With pad_to, the row is
    padded to that length by one extra all-padding segment (static shapes, e.g. for compile)."""
    ids = [e["input_ids"] for e in encoded]
    labels = [e["labels"] for e in encoded]
    lengths = [len(x) for x in ids]
    total = sum(lengths)
    if pad_to is not None and pad_to > total:
        ids.append(torch.full((pad_to - total,), pad_id, dtype=ids[0].dtype))
        labels.append(torch.full((pad_to - total,), IGNORE_INDEX, dtype=labels[0].dtype))
        lengths.append(pad_to - total)
    row = {
        "input_ids": torch.cat(ids).unsqueeze(0),
        "labels": torch.cat(labels).unsqueeze(0),
        "cu_seqlens": torch.tensor([0] + np.cumsum(lengths).tolist(), dtype=torch.int32),
        "tasks": [e["task"] for e in encoded],
    }
    for key in ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw",
                "second_per_grid_ts"):
        parts = [e[key] for e in encoded if key in e]
        row[key] = torch.cat(parts) if parts else None
    return row


class _PackedChunks(torch.utils.data.Dataset):
    """Chunk c = samples [c*chunk_size, (c+1)*chunk_size) of this rank's stream, encoded and
    packed into rows. Everything is a pure function of c, which is what makes the loader
    resumable and lets DataLoader workers build chunks independently, in order."""

    def __init__(self, loader):
        self.l = loader
        self._perm = (None, None)  # (epoch, permutation of the dataset) for shuffled epochs

    def sample_index(self, k):
        """Position k of the global stream -> dataset index (epoch-wise shuffled if finite)."""
        n = self.l.dataset_len
        if n is None:
            return k
        epoch, pos = divmod(k, n)
        if not self.l.shuffle:
            return pos
        if self._perm[0] != epoch:
            self._perm = (epoch, np.random.default_rng([self.l.seed, epoch]).permutation(n))
        return int(self._perm[1][pos])

    def __getitem__(self, c):
        # Preprocessing runs many tiny tensor ops; with several intra-op threads on a busy CPU
        # they were measured 15x slower than on one, so a chunk is built single-threaded.
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return self._build(c)
        finally:
            torch.set_num_threads(threads)

    def _build(self, c):
        l = self.l
        g = c * l.world_size + l.rank                       # global chunk: ranks interleave
        encoded, skipped, too_long = [], 0, 0
        for k in range(g * l.chunk_size, (g + 1) * l.chunk_size):
            sample = l.dataset[self.sample_index(k)]
            if sample is None:                              # a bad JSONL line, on_error="skip"
                skipped += 1
                continue
            try:
                e = encode_sample(sample, l.processor)
            except (OSError, ValueError) as err:  # name the line of a JSONL sample
                if "source" not in sample:
                    raise
                raise DataError(f"{sample['source']}: {err}") from err
            if len(e["input_ids"]) > l.max_tokens:
                if l.on_too_long == "error":
                    raise ValueError(
                        f"a {e['task'] or 'data'} sample ({sample.get('source', f'index {k}')}) "
                        f"has {len(e['input_ids'])} tokens, more than max_tokens={l.max_tokens}; "
                        f"raise max_tokens, lower the image/video pixel budget, or pass "
                        f"on_too_long='skip'")
                too_long += 1
                continue
            encoded.append(e)
        rows = best_fit_pack([len(e["input_ids"]) for e in encoded], l.max_tokens)
        return {"rows": [collate_packed([encoded[i] for i in r], l.pad_to, l.pad_id) for r in rows],
                "skipped": skipped, "too_long": too_long}


class _From(torch.utils.data.Sampler):
    def __init__(self, start):
        self.start = start

    def __iter__(self):
        c = self.start
        while True:
            yield c
            c += 1


def _worker_init(_):
    torch.set_num_threads(1)  # workers encode on one thread each; the trainer keeps the rest


class PackedLoader:
    """An endless stream of packed rows (see collate_packed) from any dataset with
    __getitem__ (SyntheticDataset, JsonlDataset, a list of samples). Finite datasets repeat
    epoch after epoch (shuffled per epoch with `seed` when shuffle=True).

    Resumable: state_dict() after n rows, given to load_state_dict() of a fresh loader,
    continues with exactly row n + 1. With torch.distributed, pass rank / world_size: each rank
    reads its own chunks. num_workers > 0 builds chunks in DataLoader worker processes."""

    def __init__(self, dataset, processor, max_tokens=2048, chunk_size=256, num_workers=0,
                 rank=0, world_size=1, shuffle=True, seed=0, pad_to_max=False,
                 on_too_long="error", prefetch_factor=2):
        if on_too_long not in ("error", "skip"):
            raise ValueError(f"on_too_long must be 'error' or 'skip', not {on_too_long!r}")
        self.dataset, self.processor = dataset, processor
        self.max_tokens, self.chunk_size, self.num_workers = max_tokens, chunk_size, num_workers
        self.rank, self.world_size, self.shuffle, self.seed = rank, world_size, shuffle, seed
        self.pad_to = max_tokens if pad_to_max else None
        self.pad_id = processor.tokenizer.token_to_id("<|endoftext|>")
        self.on_too_long, self.prefetch_factor = on_too_long, prefetch_factor
        try:
            self.dataset_len = len(dataset)
        except TypeError:
            self.dataset_len = None
        self.chunk, self.row = 0, 0          # position: next row is row `row` of chunk `chunk`
        self.skipped = self.too_long = 0     # bad lines / over-long samples met so far

    def state_dict(self):
        return {"chunk": self.chunk, "row": self.row, "skipped": self.skipped,
                "too_long": self.too_long, "seed": self.seed, "rank": self.rank,
                "world_size": self.world_size, "chunk_size": self.chunk_size,
                "max_tokens": self.max_tokens}

    def load_state_dict(self, state):
        for key in ("seed", "world_size", "chunk_size", "max_tokens"):
            if state[key] != getattr(self, key):
                raise ValueError(f"cannot resume: the saved loader had {key}={state[key]}, this one "
                                 f"has {getattr(self, key)}; resume with the same data settings")
        self.chunk, self.row = state["chunk"], state["row"]
        self.skipped, self.too_long = state["skipped"], state["too_long"]

    def __iter__(self):
        chunks = _PackedChunks(self)
        if self.num_workers > 0:
            it = iter(torch.utils.data.DataLoader(
                chunks, batch_size=None, sampler=_From(self.chunk), num_workers=self.num_workers,
                worker_init_fn=_worker_init, prefetch_factor=self.prefetch_factor,
                persistent_workers=False))
        else:
            it = (chunks[c] for c in _From(self.chunk))
        for chunk in it:
            rows = chunk["rows"]
            if self.row == 0:
                self.skipped += chunk["skipped"]
                self.too_long += chunk["too_long"]
            for r in range(self.row, len(rows)):
                self.chunk, self.row = (self.chunk, r + 1) if r + 1 < len(rows) else (self.chunk + 1, 0)
                yield rows[r]
            if not rows:  # a chunk of nothing but skipped samples
                self.chunk, self.row = self.chunk + 1, 0


def loader_throughput(loader, n_rows=50):
    """Measure a loader: rows, samples and tokens per second over its first n_rows rows,
    start-up (worker processes, the first chunk) included. bench.py compares this with the
    rate at which a training step consumes rows."""
    import time
    t0, samples, tokens = time.perf_counter(), 0, 0
    for _, row in zip(range(n_rows), loader):
        samples += len(row["tasks"])
        tokens += row["input_ids"].shape[1]
    dt = time.perf_counter() - t0
    return {"rows_per_s": n_rows / dt, "samples_per_s": samples / dt, "tokens_per_s": tokens / dt}

# ----- end of section 3-6 -----

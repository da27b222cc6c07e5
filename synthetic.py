"""
synthetic.py — the synthetic world: a deterministic, download-free stand-in for every data type
of MiMo-VL's recipe, and the from-scratch tokenizer trained on its text.

  1. Scenes and videos: coloured shapes on a 28-px grid, rendered only when a sample is kept
  2. Task generators: captions, interleaved text, counting, grounding, OCR, visual and text
     arithmetic with chains of thought, multi-image comparison, video grounding and counting,
     text-only tasks and preference pairs
  3. Determinism and splits (train / held-out by content hash), the stage-0 cell classification
     set, the stage mixtures and the RL prompt sets
  4. Tokenizer training (a Qwen2-style byte-level BPE) for from-scratch runs

    import synthetic
    s = synthetic.make_sample("count", 0)       # {"task", "messages", "answer", "reward", ...}
    ds = synthetic.SyntheticDataset(3)          # the stage-3 mixture (packing.MixtureDataset
                                                # mixes it with JSONL files)

It imports the Processor (for the chat template the tokenizer is saved with), never the model.
"""

import hashlib
import json
import random
from dataclasses import asdict, dataclass, replace
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from processor import DEFAULT_SYSTEM_PROMPT, Processor

# -----------------------------------------------------------------------------
# 1. The synthetic world: scenes and videos
#
# A deterministic, download-free stand-in for every data type of the recipe (MiMo-VL technical
# report, arXiv 2506.03569, §2.2-2.3 and §3): captions, interleaved image-text, OCR, grounding,
# counting, video with timestamps, long-CoT reasoning, text-only reasoning and preference pairs.
# The design follows what was measured in this project on 2 CPU cores: a naive scene keeps a
# 4 M-parameter model on the "no-image plateau" for many minutes, while the following learns in
# about a minute:
#   * black background, saturated red/green/blue/yellow shapes of >= 18 px;
#   * each object inside one 28-px cell of a grid: one cell = one merged visual token (14-px
#     patches, 2x2 merge), so "what is in this token" is a clean question for the model;
#   * balanced answers (counts uniform over 0..max_count), counting *by colour* among
#     distractors (counting everything is solvable from the total brightness);
#   * grounding with grid-quantised boxes first (`jitter=False`), exact pixels later.
# Coordinates are absolute pixels of the image the model sees, as in Qwen2.5-VL (technical
# report: grounding in absolute coordinates), which MiMo-VL follows:
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


# -----------------------------------------------------------------------------
# 2. Task generators: (rng, Difficulty) -> sample with Scene / VideoScene placeholders

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
    """A chain of thought, then the answer in \\boxed{} (what the verifiable rewards of the
    MiMo-VL report §3 check); cot=False keeps only the answer (the "no reasoning data" ablation)."""
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
    Bradley-Terry reward model (MiMo-VL report §3)."""
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


# text-only counterparts of the visual tasks: the stage-0 LM learns the chat format and the
# answer styles from these, so that stage 1 can freeze it (MiMo-VL report §2.3, Table 1: stage 1
# trains the projector alone)
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


# -----------------------------------------------------------------------------
# 3. Determinism and splits, the stage-0 cell set, the stage mixtures and the RL prompt sets

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


# ---- stage mixtures (MiMo-VL report §2.3, Table 1) and RL prompt sets (report §3)

@dataclass(frozen=True)
class MixItem:
    task: str
    weight: float
    difficulty: Difficulty = Difficulty()


BIG_SHAPE = Difficulty(object_cells=2, max_objects=1)          # the easiest perception task
LARGE = Difficulty(image_size=224, max_objects=6)              # > one 112-px window: exercises
                                                               # the ViT's window attention
LONG = Difficulty(reasoning_steps=4, n_images=4, n_frames=16)  # stage-4 long context

# Weights are relative. The lessons measured in this project: one easy task
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
    data in late pre-training helps reasoning (MiMo-VL report §2.3)."""
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
        m = self.mixture[mixture_draw(self._cum, i, self.split, self.seed)]
        return make_sample(m.task, i, self.split, self.seed, m.difficulty)


def mixture_draw(cum_weights, i, split="train", seed=0):
    """Position i of a mixture stream -> the index of the mixture item it draws, with
    probability weight / total (cum_weights: the running sums of the weights). A pure function
    of (seed, split, i): the draw of SyntheticDataset and of packing.MixtureDataset."""
    u = random.Random(f"{seed}/{split}/mix/{i}").random() * cum_weights[-1]
    return min(int(np.searchsorted(cum_weights, u, side="right")), len(cum_weights) - 1)


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
# 4. Tokenizer training for from-scratch runs
#
# A byte-level BPE like Qwen2's (same pre-tokenizer regex, so digits are split one by one —
# which is what makes arithmetic learnable), trained with `tokenizers` on the synthetic corpus.
# The special tokens sit at the fixed ids of the tiny preset (0-9; the official ones are
# 151643...); <think> and </think> are added tokens but not *special* ones, like MiMo's
# (MiMo-VL's tokenizer_config.json marks them "special": false, so decoding with
# skip_special_tokens keeps them).

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

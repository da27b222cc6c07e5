"""
packing.py — from conversations to training rows: JSONL datasets for real data, weighted
mixtures of JSONL files and synthetic tasks, label masks, best-fit packing and the resumable
DataLoader.

  1. JSONL datasets (one conversation or plain-text document per line, streamed lazily)
  2. Mixtures: JSONL files and synthetic tasks drawn by weight, e.g. "data/example.jsonl:0.3,count:1"
  3. Label masks, packing several samples into one (1, T) row with `cu_seqlens`, and the loader

    ds = packing.MixtureDataset(packing.parse_mixture("data/example.jsonl:1,count:1"))
    loader = packing.PackedLoader(ds, processor, max_tokens=1024)   # endless packed rows
    row = next(iter(loader))                    # {"input_ids", "labels", "cu_seqlens", ...}

It stands beside the Processor and the synthetic world (it imports both), never the model or
the kernels.
"""

import itertools
import json
import math
import os
from array import array
from dataclasses import dataclass

import numpy as np
import torch

import synthetic
from processor import load_image

# -----------------------------------------------------------------------------
# 1. JSONL datasets for real data
#
# Format: UTF-8, one JSON object per line (blank lines are ignored), either a conversation
#
#   {"messages": [{"role": "system"|"user"|"assistant", "content": "text" or [items]}, ...],
#    "task": "count", "answer": "3"}            <- task / answer optional (evaluation, RL)
#
# with items {"type": "text", "text": "..."}, {"type": "image", "image": "img/a.png"} and
# {"type": "video", "video": "clip.mp4" | "frames_dir" | ["f0.png", "f1.png", ...]}, paths
# relative to the JSONL file's folder (absolute paths also work): the message shape the Processor
# and the synthetic world use. Other keys of an item go to the preprocessing (processor.py), e.g.
# "max_pixels" or "resized_height"/"resized_width"; "sample_fps" (default 2) is the rate at which
# a folder or list of frames was taken, "fps" the rate to sample a video file at. A line may
# instead hold a plain-text document for language modelling
#
#   {"text": "a document; every token carries loss"}
#
# data/example.jsonl is a small example. Lines are parsed and their images opened only when
# read, and no line is read whole past MAX_LINE_BYTES: iterating a file of any size takes
# constant memory, indexing it 16 bytes a line. With on_error="skip", each bad line is counted
# once however often it is read, only the first MAX_ERRORS messages are kept, and a file in
# which no line is usable is an error: a loader over it would otherwise wait forever.

class DataError(ValueError):
    """A problem with a user's data, naming the file and the line where there is one."""


JSONL_ROLES = ("system", "user", "assistant")
MAX_LINE_BYTES = 16 << 20  # 16 MiB: a line is text and paths (images are files), far below this
MAX_ERRORS = 10            # error messages kept by on_error="skip" (all bad lines are counted)


def _read_lines(f, max_bytes):
    """(byte offset, line number, raw bytes) of every non-blank line of the binary file f. A
    line of more than max_bytes comes back as None and is never held in memory whole."""
    pos = 0
    for lineno in itertools.count(1):
        raw = f.readline(max_bytes + 1)
        if not raw:
            return
        start, pos = pos, pos + len(raw)
        if len(raw) > max_bytes:
            while not raw.endswith(b"\n"):  # step over the rest of the line
                raw = f.readline(1 << 20)
                if not raw:
                    break
                pos += len(raw)
            yield start, lineno, None
        elif raw.strip():
            yield start, lineno, raw


class JsonlDataset:
    """Conversations from a JSONL file. Iterate to stream it lazily, or index it: the first
    len() / [i] scans the file once for line offsets (no parsing).

    on_error="raise" (default) stops at the first bad line with a DataError naming file and
    line; on_error="skip" drops bad lines: `.skipped` counts the distinct bad lines met,
    `.errors` keeps the first MAX_ERRORS messages, and a DataError is raised once every line
    of the file is known to be bad."""

    def __init__(self, path, on_error="raise", max_line_bytes=MAX_LINE_BYTES):
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', not {on_error!r}")
        self.path = os.path.abspath(path)
        if not os.path.isfile(self.path):
            raise DataError(f"{path}: JSONL file not found")
        self.root, self.on_error, self.max_line_bytes = os.path.dirname(self.path), on_error, max_line_bytes
        self.skipped, self.errors = 0, []
        self._bad = bytearray()  # _bad[lineno] == 1: that line is known to be bad
        self._offsets = None     # (byte offsets, line numbers) of the non-blank lines

    def __repr__(self):
        return f"JsonlDataset({self.path!r})"

    def _index(self):
        if self._offsets is None:
            offsets, linenos = array("q"), array("q")  # 16 bytes a line
            with open(self.path, "rb") as f:
                for pos, lineno, _ in _read_lines(f, self.max_line_bytes):
                    offsets.append(pos)
                    linenos.append(lineno)
            self._offsets = (offsets, linenos)
        return self._offsets

    def __len__(self):
        return len(self._index()[0])

    def __getitem__(self, i):
        """Sample i (0-based over non-blank lines), or None if it is bad and on_error='skip'."""
        offsets, linenos = self._index()
        with open(self.path, "rb") as f:
            f.seek(offsets[i])
            raw = f.readline(self.max_line_bytes + 1)
        if len(raw) > self.max_line_bytes:
            raw = None
        sample = self._parse_or_skip(raw, linenos[i])
        if sample is None and self.skipped == len(offsets):
            self._nothing_usable(len(offsets))
        return sample

    def __iter__(self):
        lines = usable = 0
        with open(self.path, "rb") as f:
            for _, lineno, raw in _read_lines(f, self.max_line_bytes):
                lines += 1
                s = self._parse_or_skip(raw, lineno)
                if s is not None:
                    usable += 1
                    yield s
        if lines and not usable:
            self._nothing_usable(lines)

    def _nothing_usable(self, lines):
        raise DataError(f"{self.path}: all {lines} non-blank lines are bad, there is nothing to "
                        f"read; fix the file or leave it out (first errors: "
                        f"{' | '.join(self.errors[:3])})")

    def _parse_or_skip(self, raw, lineno):
        try:
            return self._parse(raw, lineno)
        except DataError as e:
            if self.on_error == "raise":
                raise
            if lineno >= len(self._bad):
                self._bad.extend(bytes(lineno + 1 - len(self._bad)))
            if not self._bad[lineno]:
                self._bad[lineno] = 1
                self.skipped += 1
                if len(self.errors) < MAX_ERRORS:
                    self.errors.append(str(e))
            return None

    def _fail(self, lineno, msg):
        raise DataError(f"{self.path}:{lineno}: {msg}")

    def _parse(self, raw, lineno):
        if raw is None:
            self._fail(lineno, f"line longer than {self.max_line_bytes} bytes; a line holds one "
                               f"sample whose images and videos are files, so this is not one")
        try:
            obj = json.loads(raw.decode("utf-8"))
        except RecursionError:
            self._fail(lineno, "malformed line, JSON nested too deeply")
        except ValueError as e:  # not UTF-8, not JSON, or an integer of too many digits
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
        if kind == "video":  # checked now, decoded by the Processor
            v = it.get("video")
            if isinstance(v, list):
                if not v:
                    self._fail(lineno, f"message {k}: a video frame list is empty")
                return {**it, "video": [self._path(p, lineno, k, "video frame") for p in v]}
            return {**it, "video": self._path(v, lineno, k, "video")}
        self._fail(lineno, f"message {k}: unknown item type {kind!r} in "
                           f"{json.dumps(it)[:80]}; use 'text', 'image' or 'video'")


# -----------------------------------------------------------------------------
# 2. Mixtures of JSONL files and synthetic tasks
#
# A stage trains on a weighted mixture of sources, written "source:weight,..." (weights are
# relative; a missing weight is 1):
#
#   data/example.jsonl:0.3,count:1,caption:0.5
#
# where a source is a task of the synthetic world (synthetic.TASKS) or a JSONL file (section 1).
# Position i of the stream draws its source with synthetic.mixture_draw, the draw of
# synthetic.SyntheticDataset, so a mixture of synthetic tasks alone gives exactly the samples
# SyntheticDataset gives. A JSONL source is read in a seeded order that is reshuffled each time
# the source has been drawn len(file) times (an epoch of that file). Which line position i reads
# depends on how often the source was drawn before i. Those counts are a pure function of i too
# (what PackedLoader's exact resume needs), found by redoing the draws from the nearest block of
# MIXTURE_BLOCK positions whose counts are known: about 6-18 µs a draw, measured in this project
# on a shared 2-core machine, i.e. minutes per 10 M samples. So that a resume does not redo them
# all, the loader's state_dict carries the counts at its position (MixtureDataset.state_dict).

MIXTURE_BLOCK = 1024


@dataclass(frozen=True)
class JsonlSource:
    """A JSONL file in a mixture (absolute path) with its relative weight; the counterpart of
    synthetic.MixItem (a synthetic task, weight and difficulty)."""
    path: str
    weight: float = 1.0


def parse_mixture(text, base_dir=None):
    """'data/example.jsonl:0.3,count:1,caption' -> [JsonlSource | synthetic.MixItem], in order.
    A name of synthetic.TASKS is a synthetic task (default difficulty), anything else a JSONL
    path, relative to base_dir (default: the working directory). Raises ValueError naming the
    entry for an unknown task, a missing file, or a weight that is not a number >= 0, and when
    the weights sum to 0."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError("mixture is empty; write 'source:weight,...', e.g. 'data/example.jsonl:0.3,count:1'")
    base_dir = os.path.abspath(base_dir or os.getcwd())
    items = []
    for part in text.split(","):
        part = part.strip()
        name, sep, weight = part.rpartition(":")
        name = name if sep else part
        try:
            w = float(weight) if sep else 1.0
        except ValueError:  # not a weight, unless it follows a source: the colon is the name's
            w = float("nan")
            if not (name in synthetic.TASKS or name.endswith(".jsonl")
                    or os.path.isfile(os.path.join(base_dir, name))):
                name, w = part, 1.0
        if not name:
            raise ValueError(f"mixture {text!r}: empty entry; write 'source:weight,...'")
        if not (math.isfinite(w) and w >= 0):
            raise ValueError(f"mixture {text!r}: weight {weight!r} of {name!r} must be a finite "
                             f"number >= 0")
        if name in synthetic.TASKS:
            items.append(synthetic.MixItem(name, w))
            continue
        path = os.path.join(base_dir, name)
        if not os.path.isfile(path) and name.endswith(".jsonl"):
            raise ValueError(f"mixture {text!r}: JSONL file {name!r} not found (looked for {path})")
        if not os.path.isfile(path):
            raise ValueError(f"mixture {text!r}: {name!r} is neither a synthetic task "
                             f"({', '.join(sorted(synthetic.TASKS))}) nor a JSONL file (looked "
                             f"for {path})")
        items.append(JsonlSource(path, w))
    if sum(m.weight for m in items) <= 0:
        raise ValueError(f"mixture {text!r}: the weights sum to 0; give some source a weight > 0")
    return items


class MixtureDataset:
    """An endless, map-style stream over a mixture of JsonlSource and synthetic.MixItem
    (parse_mixture, synthetic.stage_mixture): item i is a pure function of (sources, split,
    seed, i), so PackedLoader can resume at any position and its workers share nothing.

    split selects the synthetic samples (train / heldout); JSONL files have no split, keep
    held-out data in its own file. on_error is passed to every JsonlDataset: with "skip" a bad
    line reads as None (the loader drops and counts it), and a file with no usable line is a
    DataError."""

    def __init__(self, sources, split="train", seed=0, on_error="raise"):
        self.sources, self.split, self.seed = list(sources), split, seed
        if not self.sources:
            raise ValueError("a mixture needs at least one source")
        self._jsonl = {}  # source index -> JsonlDataset
        for j, s in enumerate(self.sources):
            if isinstance(s, JsonlSource):
                self._jsonl[j] = JsonlDataset(s.path, on_error)
                if len(self._jsonl[j]) == 0:
                    raise DataError(f"{s.path}: the JSONL file has no lines")
            elif not isinstance(s, synthetic.MixItem) or s.task not in synthetic.TASKS:
                raise ValueError(f"mixture source {s!r} is neither a JsonlSource nor a "
                                 f"synthetic.MixItem of a task in synthetic.TASKS")
            if not (math.isfinite(s.weight) and s.weight >= 0):
                raise ValueError(f"mixture source {s!r}: the weight must be a finite number >= 0")
        self._cum = np.cumsum([s.weight for s in self.sources]).tolist()
        if not self._cum[-1] > 0:
            raise ValueError("the mixture's weights sum to 0; give some source a weight > 0")
        self._counts = {0: np.zeros(len(self.sources), np.int64)}  # block b -> draws per
        self._resumed = 0           # source before it: block 0, the resumed one, the newest
        self._block = (None, None)  # (b, the sources drawn at the positions of block b)
        self._order = {}            # source index -> (epoch, its line order in that epoch)

    def __repr__(self):
        return "MixtureDataset(" + ",".join(
            f"{s.path if isinstance(s, JsonlSource) else s.task}:{s.weight:g}" for s in self.sources) + ")"

    def _fingerprint(self):
        """What a resumed stream must share with the saved one (the files by name and length,
        so that a moved data folder still resumes)."""
        return [f"{os.path.basename(s.path)}[{len(self._jsonl[j])} lines]:{s.weight!r}"
                if j in self._jsonl else repr(s) for j, s in enumerate(self.sources)] \
            + [self.split, self.seed]

    def state_dict(self, position):
        """The draw counts before `position` (rounded down to a block), for a loader's state:
        load_state_dict of a fresh dataset then starts counting there, not at 0."""
        b = position // MIXTURE_BLOCK
        counts = self._counts_before(b) if self._jsonl else np.zeros(len(self.sources), np.int64)
        return {"position": b * MIXTURE_BLOCK, "counts": counts.tolist(), "mixture": self._fingerprint()}

    def load_state_dict(self, state):
        if state.get("mixture") != self._fingerprint():
            raise ValueError(f"cannot resume: the saved loader read the mixture {state.get('mixture')}, "
                             f"this one is {self._fingerprint()}; resume with the same mixture")
        b, rest = divmod(state["position"], MIXTURE_BLOCK)
        counts = np.array(state["counts"], np.int64)
        if rest == 0 and counts.shape == (len(self.sources),) and counts.sum() == state["position"]:
            self._counts[b], self._resumed = counts, b

    def _draws(self, b):
        if self._block[0] != b:
            self._block = (b, np.array([synthetic.mixture_draw(self._cum, i, self.split, self.seed)
                                        for i in range(b * MIXTURE_BLOCK, (b + 1) * MIXTURE_BLOCK)]))
        return self._block[1]

    def locate(self, i):
        """Position i -> (source index j, k): position i is the k-th draw (0-based) of source j,
        a JSONL file; k is None for a synthetic source (its samples are indexed by i)."""
        j = synthetic.mixture_draw(self._cum, i, self.split, self.seed)
        if j not in self._jsonl:
            return j, None
        b, r = divmod(i, MIXTURE_BLOCK)
        return j, int(self._counts_before(b)[j] + np.count_nonzero(self._draws(b)[:r] == j))

    def _counts_before(self, b):
        """Draws of each source at the positions before block b, from the nearest known block."""
        if b not in self._counts:
            a = max(k for k in self._counts if k < b)
            counts = self._counts[a].copy()
            for c in range(a, b):
                counts += np.bincount(self._draws(c), minlength=len(self.sources))
            # keep block 0, the resumed block and the newest: a loader reads forward
            self._counts = {k: v for k, v in self._counts.items() if k in (0, self._resumed)}
            self._counts[b] = counts
        return self._counts[b]

    def first_read(self, i):
        """Whether position i reads its sample for the first time in the stream (a synthetic
        sample, or a JSONL line in the first epoch of its file): how the loader counts each bad
        line once."""
        j, k = self.locate(i)
        return k is None or k < len(self._jsonl[j])

    def __getitem__(self, i):
        j, k = self.locate(i)
        if k is None:
            s = self.sources[j]
            return synthetic.make_sample(s.task, i, self.split, self.seed, s.difficulty)
        ds = self._jsonl[j]
        epoch, pos = divmod(k, len(ds))
        if self._order.get(j, (None,))[0] != epoch:
            self._order[j] = (epoch, np.random.default_rng([self.seed, j, epoch]).permutation(len(ds)))
        return ds[int(self._order[j][1][pos])]


# -----------------------------------------------------------------------------
# 3. Packing, label masks and the DataLoader
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
    between "<|im_start|>assistant\\n" and the next <|im_end|> (the ChatML turns of the
    checkpoint's chat template, chat_template.json)."""
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
    image/video preprocessing); text documents are tokenised whole, as text: a control token's
    spelling inside a document ("<|im_end|>") stays characters, never the control token."""
    tok = processor.tokenizer
    if "messages" not in sample:
        ids = torch.tensor(processor.encode_text(sample["text"]) + [tok.token_to_id("<|endoftext|>")])
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


def vision_inputs(row, device):
    """The vision tensors of a packed row (None where it has none), moved to `device`: the
    keyword arguments MiMoVL.forward takes beside input_ids."""
    return {k: (row[k].to(device) if row.get(k) is not None else None)
            for k in ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw",
                      "second_per_grid_ts")}


class _PackedChunks(torch.utils.data.Dataset):
    """Chunk c = samples [c*chunk_size, (c+1)*chunk_size) of this rank's stream, encoded and
    packed into rows. Everything is a pure function of c, which is what makes the loader
    resumable and lets DataLoader workers build chunks independently, in order. A DataError is
    returned as a message, so the loader raises it as one line from any worker process."""

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

    def first_read(self, k, index):
        """Whether position k reads its sample for the first time: the first epoch of a finite
        dataset, or what an endless one (MixtureDataset) says. Dropped samples count once."""
        if self.l.dataset_len is not None:
            return k < self.l.dataset_len
        first_read = getattr(self.l.dataset, "first_read", None)
        return first_read is None or first_read(index)

    def __getitem__(self, c):
        # Preprocessing runs many tiny tensor ops; with several intra-op threads on a busy CPU
        # they were measured 15x slower than on one, so a chunk is built single-threaded.
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return self._build(c)
        except DataError as e:
            return {"error": str(e)}
        finally:
            torch.set_num_threads(threads)

    def _build(self, c):
        l = self.l
        g = c * l.world_size + l.rank                       # global chunk: ranks interleave
        encoded, skipped, too_long, reasons = [], 0, 0, []
        for k in range(g * l.chunk_size, (g + 1) * l.chunk_size):
            index = self.sample_index(k)
            sample = l.dataset[index]
            if sample is None:                              # a bad JSONL line, on_error="skip"
                skipped += self.first_read(k, index)
                continue
            try:
                e = encode_sample(sample, l.processor)
            except (OSError, ValueError) as err:  # name the line of a JSONL sample
                if "source" not in sample:
                    raise
                raise DataError(f"{sample['source']}: {err}") from err
            if len(e["input_ids"]) > l.max_tokens:
                where = f"a {e['task'] or 'data'} sample ({sample.get('source', f'index {index}')})"
                if l.on_too_long == "error":
                    raise DataError(
                        f"{where} has {len(e['input_ids'])} tokens, more than max_tokens="
                        f"{l.max_tokens}; raise max_tokens, lower the image/video pixel budget, or "
                        f"pass on_too_long='skip'")
                too_long += self.first_read(k, index)
                if len(reasons) < 3:
                    reasons.append(f"{where} has {len(e['input_ids'])} tokens")
                continue
            encoded.append(e)
        if not encoded:  # why nothing was usable, for the loader's error
            reasons = (reasons + getattr(l.dataset, "errors", [])[:3])[:3]
        rows = best_fit_pack([len(e["input_ids"]) for e in encoded], l.max_tokens)
        return {"rows": [collate_packed([encoded[i] for i in r], l.pad_to, l.pad_id) for r in rows],
                "skipped": skipped, "too_long": too_long, "reasons": reasons, "error": None}


class SamplerFrom(torch.utils.data.Sampler):
    """Chunk numbers start, start + 1, ... without end: the order in which a loader reads."""

    def __init__(self, start):
        self.start = start

    def __iter__(self):
        c = self.start
        while True:
            yield c
            c += 1


def worker_init(_):
    torch.set_num_threads(1)  # workers encode on one thread each; the trainer keeps the rest


class PackedLoader:
    """An endless stream of packed rows (see collate_packed) from any dataset with
    __getitem__ (MixtureDataset, synthetic.SyntheticDataset, JsonlDataset, a list of samples).
    Finite datasets repeat epoch after epoch (shuffled per epoch with `seed` when shuffle=True).

    Resumable: state_dict() after n rows, given to load_state_dict() of a fresh loader,
    continues with exactly row n + 1. With torch.distributed, pass rank / world_size: each rank
    reads its own chunks. num_workers > 0 builds chunks in DataLoader worker processes.

    `skipped` / `too_long` count the distinct samples dropped as bad (on_error="skip") or as
    longer than max_tokens (on_too_long="skip"). A loader that reads `patience` samples in a
    row without a usable one (default: 4 chunks, or two epochs of a longer finite dataset)
    raises a DataError saying why, instead of waiting forever."""

    def __init__(self, dataset, processor, max_tokens=2048, chunk_size=256, num_workers=0,
                 rank=0, world_size=1, shuffle=True, seed=0, pad_to_max=False,
                 on_too_long="error", prefetch_factor=2, patience=None):
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
        self.patience = patience or max(4 * chunk_size, 2 * (self.dataset_len or 0))
        self.chunk, self.row = 0, 0          # position: next row is row `row` of chunk `chunk`
        self.skipped = self.too_long = 0     # distinct bad lines / over-long samples so far

    def state_dict(self):
        state = {"chunk": self.chunk, "row": self.row, "skipped": self.skipped,
                 "too_long": self.too_long, "seed": self.seed, "rank": self.rank,
                 "world_size": self.world_size, "chunk_size": self.chunk_size,
                 "max_tokens": self.max_tokens}
        if hasattr(self.dataset, "state_dict"):  # MixtureDataset: its counts at our position
            state["dataset"] = self.dataset.state_dict(
                (self.chunk * self.world_size + self.rank) * self.chunk_size)
        return state

    def load_state_dict(self, state):
        for key in ("seed", "world_size", "chunk_size", "max_tokens"):
            if state[key] != getattr(self, key):
                raise ValueError(f"cannot resume: the saved loader had {key}={state[key]}, this one "
                                 f"has {getattr(self, key)}; resume with the same data settings")
        if "dataset" in state and hasattr(self.dataset, "load_state_dict"):
            self.dataset.load_state_dict(state["dataset"])
        self.chunk, self.row = state["chunk"], state["row"]
        self.skipped, self.too_long = state["skipped"], state["too_long"]

    def __iter__(self):
        chunks = _PackedChunks(self)
        if self.num_workers > 0:
            it = iter(torch.utils.data.DataLoader(
                chunks, batch_size=None, sampler=SamplerFrom(self.chunk), num_workers=self.num_workers,
                worker_init_fn=worker_init, prefetch_factor=self.prefetch_factor,
                persistent_workers=False))
        else:
            it = (chunks[c] for c in SamplerFrom(self.chunk))
        unusable = 0  # samples read in a row without a usable one
        for chunk in it:
            if chunk["error"] is not None:
                raise DataError(chunk["error"])
            rows = chunk["rows"]
            if self.row == 0:
                self.skipped += chunk["skipped"]
                self.too_long += chunk["too_long"]
            for r in range(self.row, len(rows)):
                self.chunk, self.row = (self.chunk, r + 1) if r + 1 < len(rows) else (self.chunk + 1, 0)
                yield rows[r]
            if rows:
                unusable = 0
                continue
            self.chunk, self.row = self.chunk + 1, 0  # a chunk of nothing but dropped samples
            unusable += self.chunk_size
            if unusable >= self.patience:
                ours = isinstance(self.dataset, (JsonlDataset, MixtureDataset))
                name = repr(self.dataset) if ours else type(self.dataset).__name__
                raise DataError(
                    f"{name}: no usable sample in the last {unusable} samples read (each bad, or "
                    f"longer than max_tokens={self.max_tokens}): {' | '.join(chunk['reasons'])}; "
                    f"fix the data, or raise max_tokens")


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

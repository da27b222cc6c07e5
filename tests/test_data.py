"""Tests of synthetic.py and packing.py: the synthetic world, JSONL data, the tokenizer, packing.

    python -m pytest tests/test_data.py

Expected values come from hand-built cases and from reading the rendered pixels back (connected
components of a colour), never from the generator's own bookkeeping. The last test trains a
small model on one task and checks it beats the no-image baselines on held-out data.
"""

import contextlib
import hashlib
import json
import os
import re
import signal
from collections import Counter

import numpy as np
import pytest
import torch

import packing
import synthetic
import mimovl
from synthetic import Difficulty, make_sample
from processor import Processor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(ROOT, "data", "example.jsonl")


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return synthetic.train_tokenizer(str(tmp_path_factory.mktemp("tok")))


@pytest.fixture(scope="module")
def processor(tok_dir):
    return Processor.from_pretrained(tok_dir)


def digest(x):
    """sha256 over everything in a sample: text, and the raw bytes of every image / video."""
    h = hashlib.sha256()

    def walk(v):
        if isinstance(v, torch.Tensor):
            v = v.numpy()
        if hasattr(v, "tobytes") and hasattr(v, "mode"):  # PIL image
            h.update(f"PIL{v.mode}{v.size}".encode() + v.tobytes())
        elif isinstance(v, np.ndarray):
            h.update(f"ND{v.dtype}{v.shape}".encode() + v.tobytes())
        elif isinstance(v, dict):
            for k in sorted(v):
                h.update(repr(k).encode())
                walk(v[k])
        elif isinstance(v, (list, tuple)):
            h.update(b"[")
            for e in v:
                walk(e)
            h.update(b"]")
        else:
            h.update(repr(v).encode())
    walk(x)
    return h.hexdigest()


# ---- reading scenes back from pixels (independent of the generator)

def components(mask):
    """Connected components (4-neighbour) of a boolean (H, W) mask -> list of (area, bbox)."""
    seen = np.zeros_like(mask, dtype=bool)
    out = []
    H, W = mask.shape
    for y0, x0 in zip(*np.nonzero(mask)):
        if seen[y0, x0]:
            continue
        stack, pts = [(y0, x0)], []
        seen[y0, x0] = True
        while stack:
            y, x = stack.pop()
            pts.append((y, x))
            for dy, dx in ((1, 0), (-1, 0), (0, 1), (0, -1)):
                v, u = y + dy, x + dx
                if 0 <= v < H and 0 <= u < W and mask[v, u] and not seen[v, u]:
                    seen[v, u] = True
                    stack.append((v, u))
        ys, xs = zip(*pts)
        out.append((len(pts), (min(xs), min(ys), max(xs) + 1, max(ys) + 1)))
    return out


RGB = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "yellow": (255, 255, 0)}


def colour_mask(img, colour):
    return (np.asarray(img)[..., :3] == RGB[colour]).all(-1)


def shape_of(area, box):
    """Classify a solid component by how much of its box it fills."""
    fill = area / ((box[2] - box[0]) * (box[3] - box[1]))
    return "square" if fill > 0.95 else "circle" if fill > 0.7 else "triangle" if fill > 0.4 else "?"


def images_of(sample):
    return [it["image"] for m in sample["messages"] if isinstance(m["content"], list)
            for it in m["content"] if it["type"] == "image"]


def videos_of(sample):
    return [it["video"] for m in sample["messages"] if isinstance(m["content"], list)
            for it in m["content"] if it["type"] == "video"]


# ---- the synthetic world

def test_same_seed_same_bytes_different_seed_differs():
    for task in synthetic.TASKS:
        for i in range(3):
            a, b = make_sample(task, i, seed=7), make_sample(task, i, seed=7)
            assert digest(a) == digest(b), task
        other = {digest(make_sample(task, i, seed=8)) for i in range(3)}
        assert not other & {digest(make_sample(task, i, seed=7)) for i in range(3)}, task
    # the mixture, RL prompts and the classification set are seeded the same way
    ds1, ds2, ds3 = synthetic.SyntheticDataset(3, seed=1), synthetic.SyntheticDataset(3, seed=1), synthetic.SyntheticDataset(3, seed=2)
    assert [digest(ds1[i]) for i in range(20)] == [digest(ds2[i]) for i in range(20)]
    assert [digest(ds1[i]) for i in range(20)] != [digest(ds3[i]) for i in range(20)]
    assert digest(synthetic.rl_prompts(9, seed=1)) == digest(synthetic.rl_prompts(9, seed=1))
    assert digest(synthetic.classification_sample(5)) == digest(synthetic.classification_sample(5))


@pytest.mark.parametrize("task,difficulty", [
    ("caption", synthetic.BIG_SHAPE),            # tiny space: 12 classes x 4 positions
    ("count", Difficulty()), ("ground_box", Difficulty()), ("video_grounding", Difficulty()),
    ("text_math", Difficulty()), ("ocr", Difficulty(text_len=1)),
])
def test_train_and_heldout_never_share_a_sample(task, difficulty):
    train = {digest(make_sample(task, i, "train", difficulty=difficulty)) for i in range(400)}
    held = {digest(make_sample(task, i, "heldout", difficulty=difficulty)) for i in range(80)}
    assert train and held and not train & held


def test_counting_answers_are_balanced_and_match_pixels():
    answers = []
    for i in range(300):
        s = make_sample("count", i)
        colour = re.match(r"How many (\w+) shapes", s["messages"][0]["content"][1]["text"]).group(1)
        n = len(components(colour_mask(images_of(s)[0], colour)))
        assert str(n) == s["answer"] == s["messages"][1]["content"]
        answers.append(s["answer"])
    freq = Counter(answers)
    assert sorted(freq) == ["0", "1", "2", "3", "4"]
    assert max(freq.values()) / len(answers) < 0.3  # uniform would be 0.2
    choices = Counter(make_sample("compare", i)["answer"] for i in range(300))
    assert abs(choices["1"] - choices["2"]) < 50


def test_grounding_boxes_match_pixels():
    for i in range(40):
        for task in ("ground_box", "ground_point"):
            s = make_sample(task, i, difficulty=Difficulty(jitter=bool(i % 2)))
            colour, shape = s["label"].split()
            found = [box for area, box in components(colour_mask(images_of(s)[0], colour))
                     if shape_of(area, box) == shape]
            assert found == [tuple(s["answer"])], (task, i)
            reply = json.loads(s["messages"][1]["content"])[0]
            if task == "ground_box":
                assert reply == {"bbox_2d": s["answer"], "label": s["label"]}
            else:
                x, y = reply["point_2d"]
                x1, y1, x2, y2 = s["answer"]
                assert x1 <= x < x2 and y1 <= y < y2


def test_video_timestamps_match_frames():
    d = Difficulty(n_frames=12)
    for i in range(15):
        s = make_sample("video_grounding", i, difficulty=d)
        m = re.match(r"When is the (\w+) (\w+) visible", s["messages"][0]["content"][1]["text"])
        colour, shape = m.groups()
        frames, item = videos_of(s)[0], s["messages"][0]["content"][0]
        visible = [any(shape_of(a, b) == shape for a, b in components(colour_mask(f, colour)))
                   for f in frames]
        seconds = [k / item["video_fps"] for k, v in enumerate(visible) if v]
        start, end = s["answer"]
        assert seconds[0] == start and seconds[-1] + 1 / item["video_fps"] == end
        assert all(visible[int(start * 2):int(end * 2)])
        mm = lambda t: f"{int(t) // 60:02d}:{int(t) % 60:02d}"  # noqa: E731
        assert s["messages"][1]["content"] == f"[{mm(start)},{mm(end)}]"
    answers = []
    for i in range(30):  # counting over time: each object has its own cell, so count the boxes
        s = make_sample("video_count", i)
        colour = re.match(r"How many (\w+) shapes", s["messages"][0]["content"][1]["text"]).group(1)
        boxes = set()
        for f in videos_of(s)[0]:
            boxes |= {b for a, b in components(colour_mask(f, colour))}
        assert str(len(boxes)) == s["answer"]
        answers.append(s["answer"])
    assert len(set(answers)) == 5


def test_reasoning_chains_are_correct_arithmetic():
    for task in ("visual_math", "text_math"):
        for i in range(30):
            s = make_sample(task, i, difficulty=Difficulty(reasoning_steps=3))
            reply = s["messages"][-1]["content"]
            think = re.fullmatch(r"<think>\n(.*)\n</think>\n\\boxed\{(\d+)\}", reply, re.S)
            assert think, reply
            steps = re.findall(r"(\d+) ([+-]) (\d+) = (\d+)", think.group(1))
            assert len(steps) == 3
            for a, op, b, c in steps:
                assert int(c) == (int(a) + int(b) if op == "+" else int(a) - int(b))
            assert steps[-1][3] == think.group(2) == s["answer"]
    direct = make_sample("visual_math", 0, difficulty=Difficulty(cot=False))
    assert re.fullmatch(r"\\boxed\{\d+\}", direct["messages"][-1]["content"])


def test_rl_prompts_and_preferences_and_stages():
    prompts = synthetic.rl_prompts(18)
    assert {p["task"] for p in prompts} == set(synthetic.RL_TASKS)
    for p in prompts:
        assert p["messages"][-1]["role"] == "user" and p["answer"] is not None and p["reward"]
    for i in range(10):
        s = make_sample("preference", i)
        assert s["chosen"] != s["rejected"] and s["messages"][-1]["role"] == "user"
    for stage in range(5):
        tasks = {synthetic.SyntheticDataset(stage)[i]["task"] for i in range(200)}
        assert tasks <= set(synthetic.TASKS)
    assert {synthetic.SyntheticDataset(1)[i]["task"] for i in range(50)} == {"caption"}
    s3 = {synthetic.SyntheticDataset(3)[i]["task"] for i in range(400)}
    assert {"count", "ground_box", "ocr", "video_grounding", "text_math"} <= s3
    c = synthetic.classification_sample(0)
    assert len(c["cell_labels"]) == 16 and max(c["cell_labels"]) < len(synthetic.CELL_CLASSES)


# ---- JSONL

def test_example_jsonl_loads_and_encodes(processor):
    ds = packing.JsonlDataset(EXAMPLE)
    samples = list(ds)
    assert len(samples) == len(ds) == 8 and ds.skipped == 0
    assert samples[3]["answer"] == "11" and "text" in samples[-1]
    encoded = [packing.encode_sample(s, processor) for s in samples]
    assert any("video_grid_thw" in e for e in encoded)
    assert sum(len(e.get("image_grid_thw", [])) for e in encoded) == 6


def test_jsonl_errors_name_file_and_line(tmp_path):
    (tmp_path / "a.png").write_bytes(open(os.path.join(ROOT, "data/images/red_circle.png"), "rb").read())
    good = {"messages": [{"role": "user", "content": [{"type": "image", "image": "a.png"},
                                                      {"type": "text", "text": "hi"}]},
                         {"role": "assistant", "content": "A red circle."}]}
    missing = json.loads(json.dumps(good))
    missing["messages"][0]["content"][0]["image"] = "nope.png"
    unknown = json.loads(json.dumps(good))
    unknown["messages"][0]["content"][0] = {"type": "audio", "audio": "x.wav"}
    bad_lines = {"missing": (json.dumps(missing), "image file not found: 'nope.png'"),
                 "malformed": ("{not json", "malformed line, not valid JSON"),
                 "unknown": (json.dumps(unknown), "unknown item type 'audio'")}
    for name, (line, words) in bad_lines.items():
        path = tmp_path / f"{name}.jsonl"
        path.write_text(json.dumps(good) + "\n\n" + line + "\n")  # the bad one is on line 3
        with pytest.raises(packing.DataError, match=rf"{name}\.jsonl:3: .*{re.escape(words)}"):
            list(packing.JsonlDataset(path))
        with pytest.raises(packing.DataError, match=rf"{name}\.jsonl:3: "):
            packing.JsonlDataset(path)[1]  # random access reports the same line
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join([json.dumps(good)] + [l for l, _ in bad_lines.values()]
                              + [json.dumps(good)]) + "\n")
    ds = packing.JsonlDataset(path, on_error="skip")
    assert len(list(ds)) == 2 and ds.skipped == 3
    assert [re.search(r"mixed\.jsonl:(\d+):", e).group(1) for e in ds.errors] == ["2", "3", "4"]


# ---- tokenizer

def test_tokenizer_ids_and_transformers_loading(tok_dir, processor):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast
    tok = processor.tokenizer
    for i, t in enumerate(["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>",
                           "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
                           "<think>", "</think>"]):
        assert tok.token_to_id(t) == i
    assert tok.get_vocab_size() <= 1024
    text = processor.apply_chat_template(make_sample("visual_math", 0)["messages"],
                                         add_generation_prompt=False)
    ours = tok.encode(text).ids
    for cls in (AutoTokenizer, PreTrainedTokenizerFast):
        hf = cls.from_pretrained(tok_dir)
        assert hf(text, add_special_tokens=False)["input_ids"] == ours
        assert hf.eos_token_id == 2 and hf.pad_token_id == 0
        # <think> is an added token but not a special one: it survives skip_special_tokens
        assert hf.decode(ours, skip_special_tokens=True).startswith("system\n")
        assert "<think>" in hf.decode(ours, skip_special_tokens=True)
    # digits are single tokens (Qwen2's pre-tokenizer), which arithmetic needs
    assert tok.encode("1234").tokens == ["1", "2", "3", "4"]


# ---- label masks and packing

def test_label_mask_on_a_hand_built_conversation(processor):
    img = np.zeros((56, 56, 3), np.uint8)  # 2x2 merged tokens
    conv = [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "image", "image": img},
                                         {"type": "text", "text": "What is it?"}]},
            {"role": "assistant", "content": "Nothing."},
            {"role": "user", "content": "Sure?"},
            {"role": "assistant", "content": "<think>\nyes\n</think>\n\\boxed{0}"}]
    pieces = [("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n<|vision_start|>", 0),
              ("<|image_pad|>" * 4, 0), ("<|vision_end|>What is it?<|im_end|>\n", 0),
              ("<|im_start|>assistant\n", 0), ("Nothing.<|im_end|>", 1),
              ("\n<|im_start|>user\nSure?<|im_end|>\n<|im_start|>assistant\n", 0),
              ("<think>\nyes\n</think>\n\\boxed{0}<|im_end|>", 1), ("\n", 0)]
    ids, labels = [], []
    for text, on in pieces:
        t = processor.tokenizer.encode(text).ids
        ids += t
        labels += t if on else [-100] * len(t)
    e = packing.encode_sample({"messages": conv, "task": "hand"}, processor)
    assert e["input_ids"].tolist() == ids
    assert e["labels"].tolist() == labels
    assert e["image_grid_thw"].tolist() == [[1, 4, 4]]
    # a text document: every token but the first (nothing in the sample predicts it)
    d = packing.encode_sample({"text": "One two."}, processor)
    expect = processor.tokenizer.encode("One two.").ids + [0]
    assert d["input_ids"].tolist() == expect and d["labels"].tolist() == [-100] + expect[1:]


def test_best_fit_pack_hand_case():
    # longest first: 5 -> row A (room 3); 4 -> row B (4); 3 -> A (the tightest fit, room 0);
    # 3 -> B (1); 2 -> new row C (6); 1 -> B (tightest: room 1)
    assert packing.best_fit_pack([5, 4, 3, 3, 2, 1], 8) == [[0, 2], [1, 3, 5], [4]]
    with pytest.raises(ValueError, match="9 tokens"):
        packing.best_fit_pack([9], 8)


def test_packed_rows_and_resume(processor):
    ds = synthetic.SyntheticDataset(3, seed=3)
    kw = dict(max_tokens=600, chunk_size=24)
    rows = [r for _, r in zip(range(8), packing.PackedLoader(ds, processor, **kw))]
    for r in rows:
        T = r["input_ids"].shape[1]
        cu = r["cu_seqlens"].tolist()
        assert T <= 600 and cu[0] == 0 and cu[-1] == T and len(cu) == len(r["tasks"]) + 1
        starts = torch.tensor(cu[:-1])
        assert (r["labels"][0, starts] == -100).all()  # no sample predicts the next one's start
        n_img = (r["input_ids"] == 6).sum().item()
        grid = r["image_grid_thw"]
        assert n_img == (0 if grid is None else int(grid.prod(1).sum()) // 4)
    # resuming from a state_dict continues with exactly the next row, with workers too
    loader = packing.PackedLoader(ds, processor, **kw)
    it = iter(loader)
    for _ in range(5):
        next(it)
    state = json.loads(json.dumps(loader.state_dict()))  # JSON-serialisable
    resumed = packing.PackedLoader(ds, processor, num_workers=2, **kw)
    resumed.load_state_dict(state)
    for want, got in zip(rows[5:], resumed):
        assert digest(want) == digest(got)
        if want is rows[-1]:
            break
    # distributed ranks read different chunks
    r0 = next(iter(packing.PackedLoader(ds, processor, rank=0, world_size=2, **kw)))
    r1 = next(iter(packing.PackedLoader(ds, processor, rank=1, world_size=2, **kw)))
    assert digest(r0) != digest(r1)


def test_jsonl_loader_skips_and_counts(tmp_path, processor):
    lines = open(EXAMPLE).read().splitlines()
    path = tmp_path / "mixed.jsonl"
    shutil_src = os.path.join(ROOT, "data")
    lines = [l.replace('"images/', f'"{shutil_src}/images/').replace('"clip"', f'"{shutil_src}/clip"')
             for l in lines]
    path.write_text("\n".join(lines[:3] + ["[1, 2]"] + lines[3:]) + "\n")
    loader = packing.PackedLoader(packing.JsonlDataset(path, on_error="skip"), processor,
                               max_tokens=512, chunk_size=9, shuffle=False)
    row = next(iter(loader))
    assert loader.skipped == 1 and len(row["tasks"]) >= 1



@contextlib.contextmanager
def time_limit(seconds):
    """Fail (instead of hanging the suite) if the block runs longer than `seconds`."""
    def fail(*_):
        raise TimeoutError(f"still running after {seconds} s")
    old = signal.signal(signal.SIGALRM, fail)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


@pytest.mark.parametrize("workers", [0, 1])
def test_loader_fails_fast_when_every_line_is_bad(tmp_path, processor, workers):
    """Before: the loader never yielded, re-read the bad lines forever and its error list grew
    without bound. Now: one DataError naming the file, the count and the first errors."""
    path = tmp_path / "bad.jsonl"
    path.write_text('{not json\n[1, 2]\n\n{"messages": []}\n{"text": 5}\n')
    loader = packing.PackedLoader(packing.JsonlDataset(path, on_error="skip"), processor,
                                  max_tokens=256, chunk_size=8, num_workers=workers)
    with time_limit(60), pytest.raises(packing.DataError) as err:
        next(iter(loader))
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(f"{path}: all 4 non-blank lines are bad")
    assert f"{path}:4: 'messages' must be a non-empty list" in msg


def test_bad_lines_are_counted_once_and_errors_bounded(tmp_path, processor):
    good = json.dumps({"text": "a short document"})
    path = tmp_path / "mostly_bad.jsonl"
    path.write_text("\n".join([good] + [f"[{i}]" for i in range(30)]) + "\n")
    ds = packing.JsonlDataset(path, on_error="skip")
    loader = packing.PackedLoader(ds, processor, max_tokens=64, chunk_size=93, shuffle=False)
    with time_limit(60):
        rows = [row for _, row in zip(range(4), loader)]  # 3 epochs per chunk, 4 chunks
    assert all(row["tasks"] == ["text"] * 3 for row in rows)   # 3 copies of the one good line
    assert loader.skipped == ds.skipped == 30                 # not 30 x 12 re-reads
    assert len(ds.errors) == packing.MAX_ERRORS and ds.errors[0].endswith(
        "mostly_bad.jsonl:2: expected a JSON object, got list")


def test_loader_fails_fast_when_every_sample_is_too_long(processor):
    samples = [{"text": "word " * 200, "task": "long"}] * 3
    loader = packing.PackedLoader(samples, processor, max_tokens=32, chunk_size=4,
                                  on_too_long="skip")
    with time_limit(60), pytest.raises(packing.DataError, match=r"^list: no usable sample in the "
                                       r"last 16 samples .*max_tokens=32\): a long sample \(index \d\) "
                                       r"has \d+ tokens"):
        next(iter(loader))
    assert loader.too_long == 3


def test_pathological_lines_are_bad_lines(tmp_path):
    """A line past max_line_bytes is never read whole, and JSON nested deeper than the parser
    allows is a malformed line, not a RecursionError; the lines after them still read."""
    good = json.dumps({"text": "ok"})
    path = tmp_path / "odd.jsonl"
    path.write_text("\n".join(["x" * 300000, "[" * 100000, good]) + "\n")
    ds = packing.JsonlDataset(path, on_error="skip", max_line_bytes=200000)
    assert len(ds) == 3 and ds[2]["text"] == "ok" and ds[0] is None and ds[1] is None
    assert [s["source"] for s in ds] == [f"{path}:3"] and ds.skipped == 2
    assert "odd.jsonl:1: line longer than 200000 bytes" in ds.errors[0]
    assert "odd.jsonl:2: malformed line, JSON nested too deeply" in ds.errors[1]
    with pytest.raises(packing.DataError, match=r"odd\.jsonl:1: line longer than 200000 bytes"):
        packing.JsonlDataset(path, max_line_bytes=200000)[0]

# ---- the model: packed rows compute what samples compute alone; the data is learnable

def small_config(text_width=128, text_layers=2, vit_depth=2, vit_width=64):
    cfg = mimovl.MiMoVLConfig.preset("tiny")
    t, v = cfg.text, cfg.vision
    t.hidden_size, t.intermediate_size, t.num_hidden_layers = text_width, 2 * text_width, text_layers
    t.num_attention_heads, t.num_key_value_heads = text_width // 64, 1  # head_dim 64, as the preset
    v.depth, v.hidden_size, v.intermediate_size, v.num_heads = vit_depth, vit_width, 2 * vit_width, 1
    v.fullatt_block_indexes, v.out_hidden_size = [vit_depth - 1], text_width
    return cfg.validate()


def forward_inputs(e):
    keys = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw", "second_per_grid_ts")
    return {k: e.get(k) for k in keys}


def test_packed_row_gives_each_samples_logits(processor, one_thread):
    torch.manual_seed(0)
    model = mimovl.MiMoVL(mimovl.MiMoVLConfig.preset("tiny")).float().eval()
    samples = [make_sample("count", 0), make_sample("video_count", 1), make_sample("text_math", 2),
               make_sample("compare", 3), make_sample("ground_box", 4, difficulty=synthetic.LARGE),
               {"text": "A plain document."}, make_sample("interleaved", 5)]
    enc = [packing.encode_sample(s, processor) for s in samples]
    row = packing.collate_packed(enc)
    with torch.no_grad():
        packed = model(row["input_ids"], cu_seqlens=row["cu_seqlens"], **forward_inputs(row)).logits[0]
        cu = row["cu_seqlens"].tolist()
        for k, e in enumerate(enc):
            alone = model(e["input_ids"][None], **forward_inputs(e)).logits[0]
            torch.testing.assert_close(packed[cu[k]:cu[k + 1]], alone, atol=1e-4, rtol=0)


def test_tiny_model_learns_counting_and_uses_the_image(processor, one_thread):
    """Counting shapes of one colour (answers 0-4, balanced) with a ~0.9 M-parameter model: after
    200 steps it must beat, by a clear margin, both no-image baselines on held-out scenes — the
    majority answer, and the same model shown a blank image. Measured here (2 shared cores):
    held-out accuracy ~0.5 vs ~0.24 for either baseline."""
    torch.manual_seed(0)
    # fp32: at this width bf16 autocast gains only ~1.1x (measured in this project), and fp32 keeps the
    # test the same on every CPU
    model = mimovl.MiMoVL(small_config())
    with torch.no_grad():  # brighter patch features: faster off the no-image plateau (measured here)
        model.visual.patch_embed.proj.weight.mul_(5)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.01)
    steps, batch = 200, 32
    acc, acc_blank, majority = _train_and_evaluate(model, opt, steps, batch, processor)
    print(f"held-out accuracy {acc:.3f}, blank image {acc_blank:.3f}, majority {majority:.3f}")
    assert acc >= majority + 0.15 and acc >= acc_blank + 0.15, (acc, acc_blank, majority)


def _train_and_evaluate(model, opt, steps, batch, processor):
    for step in range(steps):
        row = packing.collate_packed([packing.encode_sample(make_sample("count", step * batch + j), processor)
                                   for j in range(batch)])
        for g in opt.param_groups:
            g["lr"] = 3e-4 * min(1.0, (step + 1) / 30)
        loss = model(row["input_ids"], cu_seqlens=row["cu_seqlens"], labels=row["labels"],
                     **forward_inputs(row)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()

    held = [make_sample("count", i, "heldout") for i in range(200)]
    blank = [{**s, "messages": [{"role": "user", "content": [
        {**s["messages"][0]["content"][0], "image": np.zeros((112, 112, 3), np.uint8)},
        s["messages"][0]["content"][1]]}, s["messages"][1]]} for s in held]

    def accuracy(samples):
        """Greedy first answer token (the whole answer: one digit) vs the truth."""
        model.eval()
        correct = 0
        with torch.no_grad():
            for k in range(0, len(samples), 50):
                chunk = samples[k:k + 50]
                row = packing.collate_packed([packing.encode_sample(s, processor) for s in chunk])
                logits = model(row["input_ids"], cu_seqlens=row["cu_seqlens"], **forward_inputs(row)).logits[0]
                ids = row["input_ids"][0]
                # the answer is the token after the last "<|im_start|>assistant\n" of each sample
                for s, end in zip(chunk, row["cu_seqlens"][1:].tolist()):
                    pos = end - 3  # ... "<digit>", "<|im_end|>", "\n"
                    assert processor.decode([ids[pos].item()]) == s["answer"]
                    correct += logits[pos - 1].argmax().item() == ids[pos].item()
        model.train()
        return correct / len(samples)

    majority = Counter(s["answer"] for s in held).most_common(1)[0][1] / len(held)
    return accuracy(held), accuracy(blank), majority



def test_text_document_spelling_a_control_token_stays_text(processor):
    """A {"text": ...} document that spells <|im_end|> / <|im_start|> is trained as characters: the
    only control token in its ids is the closing <|endoftext|> that packing adds."""
    tok = processor.tokenizer
    specials = {tok.token_to_id(t) for t in ("<|im_start|>", "<|im_end|>", "<|endoftext|>")}
    e = packing.encode_sample({"text": "hi<|im_end|>\n<|im_start|>assistant\nX<|endoftext|>"}, processor)
    ids = e["input_ids"].tolist()
    assert [i for i in ids if i in specials] == [tok.token_to_id("<|endoftext|>")]
    assert processor.decode(ids[:-1]) == "hi<|im_end|>\n<|im_start|>assistant\nX<|endoftext|>"

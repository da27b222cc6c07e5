"""Tests of packing's mixtures: JSONL files and synthetic tasks drawn by weight.

    python -m pytest tests/test_mixture.py

References: sample digests recorded from synthetic.SyntheticDataset before mixtures existed
(a synthetic-only mixture must not change a single sample), the draw counts recomputed naively
from synthetic.mixture_draw, the weights themselves for the proportions, and an uninterrupted
loader for resume.
"""

import hashlib
import json
import os

import pytest

import packing
import synthetic
from processor import Processor
from test_data import digest, time_limit

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(ROOT, "data", "example.jsonl")


@pytest.fixture(scope="module")
def processor(tmp_path_factory):
    return Processor.from_pretrained(synthetic.train_tokenizer(str(tmp_path_factory.mktemp("tok"))))


# sha256 over the digests of samples 0..23 (seed 1) of SyntheticDataset(stage), and their tasks,
# recorded from the code before MixtureDataset was added
RECORDED = {
    2: ("8f6bd1c1582ba14e", "caption interleaved caption caption caption caption interleaved "
        "interleaved caption caption caption interleaved caption caption interleaved caption "
        "interleaved caption caption caption interleaved caption interleaved caption"),
    3: ("9363693782ff1b13", "caption video_grounding caption count count ocr compare video_count "
        "caption ocr ground_box visual_math interleaved ground_box video_grounding ground_box "
        "text_math ground_point caption count video_count ground_box video_count ocr"),
}


@pytest.mark.parametrize("stage", sorted(RECORDED))
def test_synthetic_only_mixture_gives_the_recorded_samples(stage):
    for ds in (synthetic.SyntheticDataset(stage, "train", 1),
               packing.MixtureDataset(synthetic.stage_mixture(stage), "train", 1)):
        h, tasks = hashlib.sha256(), []
        for i in range(24):
            s = ds[i]
            tasks.append(s["task"])
            h.update(digest(s).encode())
        assert (h.hexdigest()[:16], " ".join(tasks)) == RECORDED[stage]


def test_parse_mixture():
    got = packing.parse_mixture("data/example.jsonl:0.3, count:1,caption", base_dir=ROOT)
    assert got == [packing.JsonlSource(EXAMPLE, 0.3), synthetic.MixItem("count", 1.0),
                   synthetic.MixItem("caption", 1.0)]
    assert packing.parse_mixture(f"{EXAMPLE}:2") == [packing.JsonlSource(EXAMPLE, 2.0)]
    bad = {"": "mixture is empty",
           "count:1,": "empty entry",
           "counting:1": "'counting' is neither a synthetic task .* nor a JSONL file",
           "data/nope.jsonl:1": r"JSONL file 'data/nope.jsonl' not found \(looked for /.*/data/nope.jsonl\)",
           "count:-1": "weight '-1' of 'count' must be a finite number >= 0",
           "count:abc": "weight 'abc' of 'count'",
           "count:nan": "weight 'nan' of 'count'",
           "count:inf": "weight 'inf' of 'count'",
           "count:0,data/example.jsonl:0": "the weights sum to 0"}
    for text, words in bad.items():
        with pytest.raises(ValueError, match=words):
            packing.parse_mixture(text, base_dir=ROOT)


def test_sources_follow_the_weights_and_jsonl_lines_cycle_per_epoch():
    ds = packing.MixtureDataset(packing.parse_mixture("data/example.jsonl:0.3,ocr:1,ground_point:0.5",
                                                      base_dir=ROOT))
    n = 3000  # crosses the count blocks at 1024 and 2048
    draws = [synthetic.mixture_draw(ds._cum, i) for i in range(n)]
    for i in (0, 5, 1023, 1024, 1500, 2048, 2999):  # k = earlier draws of the same source
        assert ds.locate(i) == (draws[i], draws[:i].count(draws[i]) if draws[i] == 0 else None)
    for j, w in enumerate((0.3, 1.0, 0.5)):  # 4 standard deviations at most
        assert abs(draws.count(j) / n - w / 1.8) < 4 * (w / 1.8 * (1 - w / 1.8) / n) ** 0.5
    # every line of the file once per epoch (8 lines), in a new order each epoch
    jsonl = [i for i in range(n) if draws[i] == 0][:16]
    lines = [int(ds[i]["source"].rsplit(":", 1)[1]) for i in jsonl]
    assert sorted(lines[:8]) == sorted(lines[8:]) == list(range(1, 9)) and lines[:8] != lines[8:]
    # a pure function of the position: a fresh dataset read backwards gives the same lines
    fresh = packing.MixtureDataset(ds.sources)
    assert [fresh[i]["source"] for i in reversed(jsonl)] == [ds[i]["source"] for i in reversed(jsonl)]


def test_mixture_packs_into_rows_and_resumes_exactly(processor, monkeypatch):
    monkeypatch.setattr(packing, "MIXTURE_BLOCK", 8)  # resume crosses count blocks
    ds = packing.MixtureDataset(packing.parse_mixture("data/example.jsonl:1,ocr:1,ground_point:1",
                                                      base_dir=ROOT))
    kw = dict(max_tokens=768, chunk_size=12, seed=3)
    loader = packing.PackedLoader(ds, processor, **kw)
    rows, state = [], None
    for row in loader:
        rows.append(row)
        if len(rows) == 3:
            state = loader.state_dict()
        if len(rows) == 9:
            break
    tasks = {t for row in rows for t in row["tasks"]}
    assert {"ocr", "ground_point"} <= tasks and tasks & {"caption", "count", "ground_box", "text"}
    for row in rows:
        cu = row["cu_seqlens"].tolist()
        assert cu[-1] == row["input_ids"].shape[1] <= 768 and len(cu) == len(row["tasks"]) + 1
    def fresh():
        return packing.MixtureDataset(packing.parse_mixture("data/example.jsonl:1,ocr:1,ground_point:1",
                                                            base_dir=ROOT))
    resumed = packing.PackedLoader(fresh(), processor, num_workers=1, **kw)
    resumed.load_state_dict(state)
    for want, got in zip(rows[3:], resumed):
        assert digest(want) == digest(got)
        if want is rows[-1]:
            break
    # the state carries the draw counts at its position: a resume redoes no draw before it
    ds, blocks = fresh(), []
    draws = ds._draws
    ds._draws = lambda b: blocks.append(b) or draws(b)
    resumed = packing.PackedLoader(ds, processor, **kw)
    resumed.load_state_dict(json.loads(json.dumps(state)))  # as a checkpoint stores it
    assert digest(next(iter(resumed))) == digest(rows[3])
    assert state["dataset"]["position"] >= 16 and min(blocks) == state["dataset"]["position"] // 8
    # a different mixture cannot resume from it
    other = packing.MixtureDataset(packing.parse_mixture("data/example.jsonl:2,ocr:1,ground_point:1",
                                                         base_dir=ROOT))
    with pytest.raises(ValueError, match="cannot resume: the saved loader read the mixture"):
        packing.PackedLoader(other, processor, **kw).load_state_dict(state)


def test_bad_lines_in_a_mixture_count_once_and_a_file_of_them_fails_fast(tmp_path, processor):
    bad = [json.dumps({"messages": i}) for i in range(5)]
    path = tmp_path / "some_bad.jsonl"
    path.write_text("\n".join([json.dumps({"text": "fine"})] + bad) + "\n")
    ds = packing.MixtureDataset(packing.parse_mixture(f"{path}:1,text:0.2"), on_error="skip")
    loader = packing.PackedLoader(ds, processor, max_tokens=512, chunk_size=16)
    for _ in zip(range(4), loader):  # 64 positions: about 9 epochs of the file
        pass
    assert loader.skipped == 5
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(bad) + "\n")
    ds = packing.MixtureDataset(packing.parse_mixture(f"{path}:1,text:1"), on_error="skip")
    loader = packing.PackedLoader(ds, processor, max_tokens=512, chunk_size=16)
    with time_limit(60), pytest.raises(packing.DataError, match=rf"^{path}: all 5 non-blank lines"):
        for _ in loader:
            pass

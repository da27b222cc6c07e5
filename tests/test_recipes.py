"""train_pretrain.py's data per stage: a stage trains on a mixture of a JSONL file and synthetic
tasks (its rows hold the file's samples, token for token), resumes exactly after a crash, and
refuses bad data settings with one line (exit 2); a from-scratch --preset mimo-vl-7b takes its
special-token ids from the from-scratch tokenizer."""

import json
import os
import subprocess
import sys

import pytest
import torch

import objectives
import packing
import synthetic
import train_pretrain as tp
from mimovl import MiMoVLConfig, tiny_config
from processor import Processor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(ROOT, "data", "example.jsonl")
FAST = ["--warmup", "1", "--seq-len", "512", "--chunk-size", "4", "--workers", "0", "--no-eval",
        "--precision", "fp32", "--threads", "1"]
MIX = f"3={EXAMPLE}:1,count:1"


@pytest.fixture(scope="module")
def start(tmp_path_factory):
    """A from-scratch stage 0-lm (one step): a tokenizer and a model folder to start stage 3 from."""
    out = str(tmp_path_factory.mktemp("recipes"))
    tp.main(["--out", out, "--stage", "0-lm", *FAST, "--steps", "1", "--save-every", "0"])
    return f"{out}/stage0-lm"


def losses(out, stage):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [(r["loss"], r["grad_norm"]) for r in map(json.loads, f) if r["stage"] == stage]


def one_line_error(capsys, argv):
    with pytest.raises(SystemExit) as e:
        tp.main(argv)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err.startswith("error: ") and "\n" not in err, err
    return err


def test_a_stage_on_jsonl_and_synthetic_data_trains_on_both_and_resumes_exactly(start, tmp_path, monkeypatch,
                                                                               capsys):
    rows = []
    next_batch = objectives.NextTokenObjective.next_batch
    monkeypatch.setattr(objectives.NextTokenObjective, "next_batch", lambda self: rows.append(next_batch(self)) or rows[-1])
    common = ["--stage", "3", "--from", start, *FAST, "--steps", "4", "--save-every", "1", "--stage-data", MIX]
    full, cut = str(tmp_path / "full"), str(tmp_path / "cut")
    tp.main(["--out", full, *common])
    said = capsys.readouterr().out
    assert f"3      {os.path.relpath(EXAMPLE)} 45%, count 45%, caption 8%, interleaved 2%" in said  # + replay

    # every packed segment is one sample encoded alone; the file's samples are among them
    processor = Processor.from_pretrained(start)
    segments = set()
    for row in (r for step in rows for r in step):
        ids, cu = row["input_ids"][0].tolist(), row["cu_seqlens"].tolist()
        segments |= {tuple(ids[a:b]) for a, b in zip(cu, cu[1:])}
    from_file = {tuple(packing.encode_sample(s, processor)["input_ids"].tolist())
                 for s in packing.JsonlDataset(EXAMPLE)}
    assert len(segments & from_file) >= 2
    assert segments - from_file                                             # and synthetic ones

    with pytest.raises(SystemExit) as e:
        tp.main(["--out", cut, *common, "--debug-stop-after", "2"])          # "crashes" after step 2
    assert e.value.code == 3
    tp.main(["--out", cut, *common, "--resume"])
    assert "resuming from" in capsys.readouterr().out
    assert losses(cut, "3") == losses(full, "3") and len(losses(full, "3")) == 4   # bit-identical

    # resuming the finished stage's checkpoint with other data is refused, not silently mixed
    os.remove(f"{cut}/stage3/pretrain_stage.json")
    err = one_line_error(capsys, ["--out", cut, *common[:-1], "3=count:1", "--resume"])
    assert "stage 3: cannot resume" in err and "same mixture" in err


def test_stage_data_file_paths_are_relative_to_the_file_and_later_flags_win(tmp_path):
    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps({"3": os.path.relpath(EXAMPLE, tmp_path) + ":0.3,count:1", "0-lm": "text"}))
    args = tp.build_parser().parse_args(["--mixture", "caption", "--stage-data-file", str(recipe),
                                         "--stage-data", "4=ocr:2"])
    data = tp.stage_data(args)
    (jsonl, count), = [data["3"]]
    assert os.path.normpath(jsonl.path) == EXAMPLE and jsonl.weight == 0.3 and count == synthetic.MixItem("count", 1.0)
    assert data["0-lm"] == [synthetic.MixItem("text", 1.0)]
    assert data["4"] == [synthetic.MixItem("ocr", 2.0)]
    assert data["1"] == data["2"] == [synthetic.MixItem("caption", 1.0)]   # --mixture: stages 1-4
    # stage 3 replays stages 1 and 2 as the command line gives them (here: captions)
    args.replay = 0.2
    mix = tp.stage_mixture("3", args, data)
    assert [(type(m).__name__, round(m.weight, 6)) for m in mix] == [
        ("JsonlSource", round(0.8 * 0.3 / 1.3, 6)), ("MixItem", round(0.8 / 1.3, 6)), ("MixItem", 0.1), ("MixItem", 0.1)]


@pytest.mark.parametrize("argv, words", [
    (["--stage-data", "3=nosuch.jsonl:1"], ["--stage-data (stage 3)", "nosuch.jsonl", "not found"]),
    (["--stage-data", "3=count:x"], ["--stage-data (stage 3)", "'x'"]),
    (["--stage-data", "0-vit=count"], ["--stage-data '0-vit=count'", "STAGE=source:weight"]),
    (["--mixture", "countt"], ["--mixture (stage 1)", "'countt'", "neither a synthetic task"]),
    (["--stage-data-file", "missing.json"], ["--stage-data-file missing.json", "cannot read"]),
    (["--rows", "0"], ["--rows", "positive"]),
])
def test_bad_data_settings_are_one_line_errors_before_any_work(tmp_path, capsys, argv, words):
    err = one_line_error(capsys, ["--out", str(tmp_path / "o"), *argv])
    assert all(w in err for w in words), err
    assert not os.path.exists(tmp_path / "o" / "tokenizer")


def test_a_jsonl_file_without_a_usable_line_stops_the_stage_with_one_line(start, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": "not a list"}\n{"no": "messages"}\n')
    err = one_line_error(capsys, ["--out", str(tmp_path / "o"), "--stage", "3", "--from", start, *FAST,
                                  "--steps", "1", "--stage-data", f"3={bad}:1"])
    assert err.startswith("error: stage 3: ") and str(bad) in err


def test_a_from_scratch_7b_preset_takes_the_token_ids_of_the_from_scratch_tokenizer(start):
    processor = Processor.from_pretrained(start)
    assert processor.tokenizer.token_to_id("<|image_pad|>") == 6 != 151655
    cfg = tp.scratch_config(tp.build_parser().parse_args(["--preset", "mimo-vl-7b"]), processor)
    official = MiMoVLConfig.preset("mimo-vl-7b")
    assert (cfg.text, cfg.vision) == (official.text, official.vision)          # the 7B architecture
    assert official.image_token_id == 151655
    tok = processor.tokenizer
    assert (cfg.image_token_id, cfg.video_token_id, cfg.vision_start_token_id, cfg.vision_end_token_id,
            cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id) == tuple(tok.token_to_id(t) for t in (
                "<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>", "<|endoftext|>",
                "<|im_end|>", "<|endoftext|>"))
    # the tiny preset's ids are already the tokenizer's: from-scratch tiny runs are unchanged
    tiny = tp.scratch_config(tp.build_parser().parse_args([]), processor)
    assert tiny == tiny_config(1)
    assert torch.equal(tp.fresh_model(tp.build_parser().parse_args([]), processor).lm_head.weight,
                       tp.fresh_model(tp.build_parser().parse_args([]), processor).lm_head.weight)


def two_towers(start, root):
    """(C, L): C a whole model folder (the start folder's), L its LM alone as a text-only
    Qwen2ForCausalLM folder (no vision config, Qwen2 naming) plus a MiMo-7B-style MTP tensor."""
    from safetensors.torch import load_file, save_file
    both, lm = os.path.join(root, "both"), os.path.join(root, "lm")
    os.makedirs(both)
    os.makedirs(lm)
    for name in os.listdir(start):
        if not os.path.isdir(os.path.join(start, name)):
            with open(os.path.join(start, name), "rb") as src, open(os.path.join(both, name), "wb") as dst:
                dst.write(src.read())
    weights = load_file(os.path.join(both, "model.safetensors"))
    text = {k: v for k, v in weights.items() if not k.startswith("visual.")}
    text["model.mtp_layers.0.input_proj.weight"] = torch.randn(4, 4)
    save_file(text, os.path.join(lm, "model.safetensors"), metadata={"format": "pt"})
    cfg = json.load(open(os.path.join(both, "config.json")))
    cfg = {k: v for k, v in cfg.items() if k not in ("vision_config", "rope_scaling") and not k.startswith(
        ("image_", "video_", "vision_"))}
    json.dump({**cfg, "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2"},
              open(os.path.join(lm, "config.json"), "w"))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        with open(os.path.join(both, name), "rb") as src, open(os.path.join(lm, name), "wb") as dst:
            dst.write(src.read())
    return both, lm


def test_stage1_from_separate_vit_and_lm_folders_equals_one_folder(start, tmp_path, capsys):
    """--init-vit V --init-lm L (the paper's start: ViT from one checkpoint, a Qwen2-named text LM
    with MiMo-7B's mtp_layers from another) trains stage 1 exactly as --init C, where C holds the
    same ViT and LM: same losses, bit for bit; the MTP tensors are dropped. Under torchrun with
    --fsdp (2 processes: each rank reads its rows of the two folders) the losses are those of one
    process."""
    from safetensors.torch import load_file
    both, lm = two_towers(start, str(tmp_path))
    common = ["--stage", "1", *FAST, "--steps", "2", "--save-every", "0", "--rows", "2"]
    tp.main(["--out", str(tmp_path / "one"), "--init", both, *common])
    tp.main(["--out", str(tmp_path / "two"), "--init-vit", both, "--init-lm", lm, *common])
    assert "(dropped 1 model.mtp_layers.* tensors)" in capsys.readouterr().out
    assert losses(str(tmp_path / "two"), "1") == losses(str(tmp_path / "one"), "1")
    assert len(losses(str(tmp_path / "one"), "1")) == 2
    a = load_file(str(tmp_path / "one" / "stage1" / "model.safetensors"))
    b = load_file(str(tmp_path / "two" / "stage1" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    err = one_line_error(capsys, ["--out", str(tmp_path / "bad"), "--init-vit", both, *common])
    assert "--init-vit and --init-lm together" in err

    sharded = str(tmp_path / "fsdp")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(ROOT, "train_pretrain.py"), "--out", sharded, "--init-vit", both, "--init-lm", lm,
           "--fsdp", *common]
    r = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    for (x, gx), (y, gy) in zip(losses(sharded, "1"), losses(str(tmp_path / "one"), "1"), strict=True):
        assert x == pytest.approx(y, rel=1e-5) and gx == pytest.approx(gy, rel=1e-4)

    # the README's command for the paper's start, at tiny scale: the paper's stage table, gradient
    # checkpointing and the stage's data from a recipe file (lengths and batch shrunk by FAST)
    recipe = tmp_path / "my_recipe.json"
    recipe.write_text(json.dumps({"1": f"{EXAMPLE}:1"}))
    paper = str(tmp_path / "paper")
    r = subprocess.run([*cmd[:cmd.index("--out")], "--out", paper, "--init-vit", both, "--init-lm", lm,
                        "--recipe", "paper", "--fsdp", "--grad-checkpointing", "--stage-data-file",
                        str(recipe), "--stage", "1", *FAST, "--steps", "1", "--save-every", "0", "--rows", "2"],
                       cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "(paper table)" in r.stdout and len(losses(paper, "1")) == 1

"""The chat CLI end to end on a tiny random checkpoint with a tokenizer saved beside it."""

import io
from contextlib import redirect_stderr, redirect_stdout

import numpy as np
import pytest
import torch
from PIL import Image

import chat
from mimovl import MiMoVL, MiMoVLConfig

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
            "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<think>", "</think>"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders
    path = tmp_path_factory.mktemp("tiny")
    words = ["system", "user", "assistant", "You", "are", "MiMo", "an", "AI", "developed", "by", "Xiaomi",
             "what", "is", "this", "?", ".", ",", "\n", "a", "red", "circle"]
    vocab = {t: i for i, t in enumerate(SPECIALS)}
    for w in words:
        vocab.setdefault(w, len(vocab))
    vocab["[UNK]"] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Split(pattern=" ", behavior="removed")
    tok.add_special_tokens(SPECIALS)
    tok.decoder = decoders.WordPiece(prefix="##")
    tok.save(str(path / "tokenizer.json"))
    torch.manual_seed(0)
    cfg = MiMoVLConfig.preset("tiny")
    cfg.text.vocab_size = 64
    MiMoVL(cfg).save_pretrained(path)
    Image.fromarray((np.random.default_rng(0).random((60, 90, 3)) * 255).astype(np.uint8)).save(path / "img.png")
    return path


def run(argv):
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = chat.main(argv)
    return code, out.getvalue(), err.getvalue()


def test_cli_answers_about_an_image(ckpt):
    code, out, err = run(["--model", str(ckpt), "--image", str(ckpt / "img.png"), "--max-new-tokens", "6",
                          "--dtype", "float32", "what is this ?"])
    assert code == 0, err
    assert "float32" in err
    # the streamed text equals a direct greedy generate() on the same processed inputs
    from processor import Processor
    proc = Processor.from_pretrained(ckpt)
    model = MiMoVL.from_pretrained(ckpt, dtype=torch.float32)
    batch = proc([{"role": "user", "content": [{"type": "image", "image": str(ckpt / "img.png")},
                                               {"type": "text", "text": "what is this ?"}]}])
    ids = model.generate(**batch, max_new_tokens=6, stop_token_ids=proc.eos_token_ids)[0].tolist()
    ids = [i for i in ids if i not in proc.eos_token_ids]
    assert out.rstrip("\n") == proc.decode(ids)


def test_cli_errors(ckpt, tmp_path):
    code, _, err = run(["--model", str(tmp_path / "missing"), "hi"])
    assert code == 2 and "does not exist" in err
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    code, _, err = run(["--model", str(ckpt), "--image", str(bad), "--dtype", "float32", "hi"])
    assert code == 2 and "bad.png" in err
    empty = tmp_path / "frames"
    empty.mkdir()
    code, _, err = run(["--model", str(ckpt), "--video", str(empty), "--dtype", "float32", "hi"])
    assert code == 2 and "frames" in err
    code, _, err = run(["--model", str(ckpt), "--dtype", "float32", "--max-new-tokens", "100000", "hi"])
    assert code == 2 and "exceeds the context" in err


def test_cli_multi_turn(ckpt, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO("what is this ?\na red circle ?\n\n"))
    code, out, err = run(["--model", str(ckpt), "--max-new-tokens", "3", "--dtype", "float32"])
    assert code == 0, err
    assert len(out.strip("\n").split("\n")) >= 2      # one streamed reply per turn


def test_cli_bf16_packed_path_runs(ckpt):
    code, out, err = run(["--model", str(ckpt), "--image", str(ckpt / "img.png"), "--max-new-tokens", "4",
                          "--dtype", "bfloat16", "what is this ?"])
    assert code == 0, err
    assert "bfloat16" in err

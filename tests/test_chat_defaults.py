"""Chat defaults from the checkpoint: sampling settings from generation_config.json (flags win),
the no-think style chosen from the chat template, the paper-eval preset, and the note when an
answer stops at the token limit. Tiny checkpoints are built per test (tests/test_faults.py).

    python -m pytest -q tests/test_chat_defaults.py
"""

import io
from contextlib import redirect_stderr, redirect_stdout

import pytest
import torch

from chat import DEFAULT_GENERATION, chat, generation_settings, main
from mimovl import MiMoVL
from processor import DEFAULT_CHAT_TEMPLATE, PRESETS, Processor, split_thinking
from test_faults import tiny_config, write_chat_checkpoint

# The 2508 models' way of switching thinking off, as a template handles it: the user turn's
# trailing " /no_think" is kept and the assistant turn opens with an empty thought.
SLASH_TEMPLATE = DEFAULT_CHAT_TEMPLATE.replace(
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if messages[-1]['content'] is string and messages[-1]['content'].endswith('/no_think') %}"
    "<think>\n\n</think>\n{% endif %}{% endif %}")


def run(argv):
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


def settings_line(err):
    return next(line for line in err.splitlines() if line.startswith("sampling: "))


@pytest.fixture(scope="module")
def sampled(tmp_path_factory):
    """A checkpoint whose generation_config.json asks for sampling."""
    return write_chat_checkpoint(tmp_path_factory.mktemp("sampled") / "ckpt", generation={
        "eos_token_id": [2, 0], "do_sample": True, "temperature": 0.7, "top_p": 0.8, "top_k": 20,
        "max_new_tokens": 5})


def test_settings_come_from_generation_config_then_flags(sampled, tmp_path):
    processor = Processor.from_pretrained(sampled)
    assert generation_settings(processor) == {
        "temperature": (0.7, "generation_config.json"), "top_p": (0.8, "generation_config.json"),
        "top_k": (20, "generation_config.json"), "max_new_tokens": (5, "generation_config.json")}
    assert generation_settings(processor, temperature=0.0, top_k=3)["temperature"] == (0.0, "override")
    plain = Processor.from_pretrained(write_chat_checkpoint(tmp_path / "plain"))
    assert generation_settings(plain) == {k: (v, "default") for k, v in DEFAULT_GENERATION.items()}
    assert DEFAULT_GENERATION["max_new_tokens"] == 16384
    greedy = Processor.from_pretrained(write_chat_checkpoint(tmp_path / "greedy", generation={
        "do_sample": False, "temperature": 0.7, "top_p": 0.8}))
    assert generation_settings(greedy)["temperature"] == (0.0, "generation_config.json (do_sample=false: greedy)")


def test_cli_samples_with_the_checkpoint_settings_unless_flags_say_otherwise(sampled):
    question = "what is this ?"
    processor = Processor.from_pretrained(sampled)
    model = MiMoVL.from_pretrained(sampled, dtype=torch.float32)
    batch = processor([{"role": "user", "content": [{"type": "text", "text": question}]}])

    def expected(**settings):
        ids = model.generate(**batch, seed=11, stop_token_ids=processor.eos_token_ids, **settings)[0].tolist()
        return processor.decode([i for i in ids if i not in processor.eos_token_ids])

    code, out, err = run(["--model", str(sampled), "--dtype", "float32", "--seed", "11", question])
    assert code == 0, err
    assert settings_line(err) == ("sampling: temperature=0.7 (generation_config.json), top_p=0.8 "
                                  "(generation_config.json), top_k=20 (generation_config.json), "
                                  "max_new_tokens=5 (generation_config.json)")
    assert out.rstrip("\n") == expected(temperature=0.7, top_p=0.8, top_k=20, max_new_tokens=5)
    code, out, err = run(["--model", str(sampled), "--dtype", "float32", "--seed", "11", "--temperature", "0",
                          "--max-new-tokens", "3", question])
    assert code == 0, err
    assert "temperature=0.0 (--temperature)" in err and "max_new_tokens=3 (--max-new-tokens)" in err
    assert "top_k=20 (generation_config.json)" in err
    assert out.rstrip("\n") == expected(temperature=0.0, max_new_tokens=3)


def test_chat_function_uses_the_same_defaults(sampled):
    processor = Processor.from_pretrained(sampled)
    model = MiMoVL.from_pretrained(sampled, dtype=torch.float32)
    conversation = [{"role": "user", "content": "what is this ?"}]
    batch = processor(conversation)
    ids = model.generate(**batch, seed=5, temperature=0.7, top_p=0.8, top_k=20, max_new_tokens=5,
                         stop_token_ids=processor.eos_token_ids)[0].tolist()
    stopped = any(i in processor.eos_token_ids for i in ids)
    text = processor.decode([i for i in ids if i not in processor.eos_token_ids])
    reply = chat(model, processor, conversation, seed=5)
    assert (reply.reasoning, reply.answer) == split_thinking(text)
    assert reply.truncated == (not stopped)


@pytest.mark.parametrize("template, style", [(None, "prefill"), (SLASH_TEMPLATE, "slash")])
def test_no_think_style_is_chosen_per_checkpoint(tmp_path, template, style):
    folder = write_chat_checkpoint(tmp_path / "ckpt", template=template)
    processor = Processor.from_pretrained(folder)
    assert processor.no_think_style == style
    prompt = processor.apply_chat_template([{"role": "user", "content": "what is this ?"}], think=False)
    if style == "slash":
        assert prompt.endswith("user\nwhat is this ? /no_think<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n")
    else:
        assert prompt.endswith("user\nwhat is this ?<|im_end|>\n<|im_start|>assistant\n<think>\n</think>\n")
    code, _, err = run(["--model", str(folder), "--dtype", "float32", "--max-new-tokens", "1", "--no-think", "hi"])
    assert code == 0, err
    assert f"thinking: off, style '{style}'" in err
    assert ("handles '/no_think'" in err) == (style == "slash")
    # a flag overrides the detection
    code, _, err = run(["--model", str(folder), "--dtype", "float32", "--max-new-tokens", "1", "--no-think",
                        "--no-think-style", "suffix", "hi"])
    assert code == 0 and "style 'suffix' (chosen explicitly)" in err, err


def test_paper_eval_preset_reaches_the_processor(tmp_path, monkeypatch):
    folder = write_chat_checkpoint(tmp_path / "ckpt")
    seen = {}

    def fake_stream(model, processor, conversation, **kw):
        seen.update(kw, conversation=conversation)
        yield "ok"
        return "stop"
    monkeypatch.setattr("chat.chat_stream", fake_stream)
    code, out, err = run(["--model", str(folder), "--preset", "paper-eval", "--video", str(folder), "hi"])
    assert code == 0 and out == "ok\n", err
    assert seen["max_pixels"] == 4096 * 28 * 28
    video = seen["conversation"][0]["content"][0]
    assert {k: video[k] for k in ("fps", "max_frames", "total_pixels")} == \
        {"fps": 2.0, "max_frames": 256, "total_pixels": 16384 * 28 * 28}
    assert PRESETS["paper-eval"]["video"]["max_frames"] == 256 and "preset paper-eval" in err
    code, _, err = run(["--model", str(folder), "--preset", "paper-eval", "--max-pixels", "100000", "hi"])
    assert code == 0 and seen["max_pixels"] == 100000, err          # an explicit flag wins


@pytest.mark.parametrize("eos, truncated", [([2], True), ([2, 0], False)])
def test_truncation_note(tmp_path, eos, truncated):
    """A zero lm_head makes every logit equal, so greedy decoding always picks id 0 (<|endoftext|>):
    with 0 among the stop ids the answer ends at once, without it it runs into the limit."""
    vocab, hidden = tiny_config().text.vocab_size, tiny_config().text.hidden_size
    folder = write_chat_checkpoint(tmp_path / "ckpt", generation={"eos_token_id": eos},
                                   lm_head=torch.zeros(vocab, hidden))
    code, out, err = run(["--model", str(folder), "--dtype", "float32", "--max-new-tokens", "4", "hi"])
    assert code == 0, err
    assert ("stopped at the new-token limit" in err) == truncated
    assert out == ("<|endoftext|>" * 4 + "\n" if truncated else "\n")
    processor = Processor.from_pretrained(folder)
    model = MiMoVL.from_pretrained(folder)
    reply = chat(model, processor, [{"role": "user", "content": "hi"}], max_new_tokens=4)
    assert reply.truncated == truncated
    assert reply.answer == ("<|endoftext|>" * 4 if truncated else "")


def test_default_budget_shrinks_to_the_context(tmp_path):
    """With no max_new_tokens anywhere the default of 16384 would not fit a 128-token model: it
    shrinks to the room left, and the reply is flagged when it fills it."""
    vocab, hidden = tiny_config().text.vocab_size, tiny_config().text.hidden_size
    folder = write_chat_checkpoint(tmp_path / "ckpt", generation={"eos_token_id": [2]},
                                   lm_head=torch.zeros(vocab, hidden), context=128)
    processor = Processor.from_pretrained(folder)
    model = MiMoVL.from_pretrained(folder)
    conversation = [{"role": "user", "content": "hi"}]
    prompt = processor(conversation)["input_ids"].shape[1]
    reply = chat(model, processor, conversation)
    assert reply.truncated and reply.answer == "<|endoftext|>" * (128 - prompt)

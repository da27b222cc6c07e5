"""The Processor: chat template, placeholder expansion, tokenisation (processor.py §2; Qwen2.5-VL's chat template and Qwen2_5_VLProcessor).

The reference is transformers 4.57: PreTrainedTokenizerFast + Qwen2VLImageProcessor driven by the real
Qwen2_5_VLProcessor.__call__ / apply_chat_template code, with images fetched by qwen-vl-utils. The
tokenizer is a small byte-level BPE trained here, with the Qwen special tokens, saved as tokenizer.json
+ tokenizer_config.json + chat_template.json in a temporary folder. No network.

    python -m pytest tests/test_processor.py
"""

import json

import jinja2
import numpy as np
import pytest
import torch
from PIL import Image
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast, Qwen2VLImageProcessor
from transformers.models.qwen2_5_vl.processing_qwen2_5_vl import Qwen2_5_VLProcessor


from test_preprocess import photo, qvu
from processor import DEFAULT_CHAT_TEMPLATE, Processor, split_thinking

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]  # ids 0..7

# Qwen2.5-VL-7B-Instruct's chat template, typed here so the parity test does not use the code under test.
QWEN25_VL_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in "
    "content or 'image_url' in content %}{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type']"
    " == 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
    "Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in "
    "content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# A template in transformers' style that uses the sandbox's extras: loop controls, the non-escaping
# tojson filter, raise_exception, the {% generation %} tag and the special-token variables.
EXTRAS_TEMPLATE = """{%- for message in messages %}
{%- if message['role'] not in ['system', 'user', 'assistant'] %}{{ raise_exception('unknown role ' + message['role']) }}{% endif %}
{%- if message['role'] == 'system' and not loop.first %}{% continue %}{% endif %}
<|im_start|>{{ message['role'] }}
{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] }}{% endgeneration %}{% else %}{{ message['content'] | tojson }}{% endif %}{{ eos_token }}
{% endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""


def train_tokenizer():
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    corpus = ["You are a helpful assistant.", "What is in the picture? A red circle and two blue squares.",
              "Count the objects, then answer with one number.", "The answer is 3. Describe the video.",
              "Élan: naïve café — 東京 😀 quotes \"<b>&\""]
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(corpus, trainer)
    tokenizer.add_tokens([AddedToken("<think>", normalized=False), AddedToken("</think>", normalized=False)])
    return tokenizer


def write_checkpoint(folder, template=QWEN25_VL_TEMPLATE, config_extra=None):
    folder.mkdir(parents=True, exist_ok=True)
    train_tokenizer().save(str(folder / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
              "clean_up_tokenization_spaces": False, **(config_extra or {})}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    if template is not None:
        (folder / "chat_template.json").write_text(json.dumps({"chat_template": template}))
    return folder


def reference_processor(folder, template):
    """transformers' Qwen2_5_VLProcessor without its __init__, which insists on a video processor (and
    so on torchvision); __call__ and apply_chat_template are the real 4.57 code."""
    tokenizer = PreTrainedTokenizerFast.from_pretrained(folder)
    tokenizer.padding_side = "left"
    tokenizer.model_input_names = ["input_ids", "attention_mask"]  # as Qwen2TokenizerFast declares
    processor = Qwen2_5_VLProcessor.__new__(Qwen2_5_VLProcessor)
    processor.tokenizer = tokenizer
    processor.image_processor = Qwen2VLImageProcessor(min_pixels=3136, max_pixels=12845056)
    processor.video_processor = None
    processor.chat_template = template
    processor.image_token, processor.video_token = "<|image_pad|>", "<|video_pad|>"
    processor.image_token_id = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    processor.video_token_id = tokenizer.convert_tokens_to_ids("<|video_pad|>")
    return processor


def reference_inputs(ref, conversations):
    texts = [ref.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in conversations]
    # The tokenizer's own apply_chat_template renders the same string.
    assert texts == [ref.tokenizer.apply_chat_template(c, chat_template=ref.chat_template, tokenize=False,
                                                       add_generation_prompt=True) for c in conversations]
    images, _ = qvu.process_vision_info(conversations)
    return texts, ref(text=texts, images=images, padding=True, return_tensors="pt")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("ckpt"))


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    paths = []
    for i, (h, w) in enumerate([(157, 211), (90, 333), (260, 180)]):
        paths.append(str(folder / f"img{i}.jpg"))
        Image.fromarray(photo(h, w, seed=20 + i)).save(paths[-1], quality=90)
    rgba = photo(120, 150, seed=30, channels=4)
    rgba[:40, :, 3] = 0
    paths.append(str(folder / "alpha.png"))
    Image.fromarray(rgba, "RGBA").save(paths[-1])
    return paths


def conversations(images):
    single = [{"role": "user", "content": [{"type": "image", "image": images[0]},
                                           {"type": "text", "text": "What is in the picture?"}]}]
    multi_turn = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": [{"type": "image", "image": images[1]}, {"type": "text", "text": "Count the objects."}]},
        {"role": "assistant", "content": "<think>\nTwo blue squares.\n</think>\nThe answer is 2."},
        {"role": "user", "content": [{"type": "text", "text": "And these? "},
                                     {"type": "image", "image": images[2], "max_pixels": 20000},
                                     {"type": "image", "image": Image.open(images[3])},
                                     {"type": "text", "text": "Élan: café 東京 😀"}]},
    ]
    text_only = [{"role": "user", "content": "Describe the video."}]
    return single, multi_turn, text_only


def assert_same_inputs(ours, theirs):
    assert set(theirs.keys()) <= set(ours.keys()) | {"second_per_grid_ts"}
    assert torch.equal(ours["input_ids"], theirs["input_ids"])
    assert torch.equal(ours["attention_mask"], theirs["attention_mask"])
    if "pixel_values" in theirs:
        assert torch.equal(ours["image_grid_thw"], theirs["image_grid_thw"])
        assert ours["pixel_values"].shape == theirs["pixel_values"].shape
        assert (ours["pixel_values"] - theirs["pixel_values"]).abs().max() <= 1e-6


@pytest.mark.parametrize("case", ["single", "multi_turn", "text_only"])
def test_prompt_and_ids_match_transformers(checkpoint, images, case):
    conversation = dict(zip(["single", "multi_turn", "text_only"], conversations(images)))[case]
    ours = Processor.from_pretrained(checkpoint)
    texts, theirs = reference_inputs(reference_processor(checkpoint, QWEN25_VL_TEMPLATE), [conversation])
    assert ours.apply_chat_template(conversation) == texts[0]
    assert_same_inputs(ours(conversation), theirs)


def test_left_padded_batch_matches_transformers(checkpoint, images):
    single, multi_turn, text_only = conversations(images)
    batch = [single, multi_turn, text_only]
    ours = Processor.from_pretrained(checkpoint)(batch)
    _, theirs = reference_inputs(reference_processor(checkpoint, QWEN25_VL_TEMPLATE), batch)
    assert_same_inputs(ours, theirs)
    assert ours["attention_mask"][2, 0] == 0 and ours["input_ids"][2, 0] == 0  # padded on the left with <|endoftext|>
    # Each image's token count is t*h*w/4 of its grid.
    assert int((ours["input_ids"] == 6).sum()) == int(ours["image_grid_thw"].prod(-1).sum()) // 4


def test_template_extras_render_like_transformers(tmp_path):
    folder = write_checkpoint(tmp_path / "ckpt", template=EXTRAS_TEMPLATE)
    ours = Processor.from_pretrained(folder)
    reference = PreTrainedTokenizerFast.from_pretrained(folder)
    conversation = [{"role": "system", "content": "sys"}, {"role": "user", "content": 'say "<b>&" 東京'},
                    {"role": "assistant", "content": "ok"}, {"role": "system", "content": "skipped"},
                    {"role": "user", "content": "again"}]
    for add_generation_prompt in (True, False):
        expected = reference.apply_chat_template(conversation, chat_template=EXTRAS_TEMPLATE, tokenize=False,
                                                 add_generation_prompt=add_generation_prompt)
        assert ours.apply_chat_template(conversation, add_generation_prompt=add_generation_prompt) == expected
        assert ours.encode(expected) == reference(expected)["input_ids"]
    bad = conversation + [{"role": "tool", "content": "x"}]
    with pytest.raises(jinja2.TemplateError, match="unknown role tool"):
        reference.apply_chat_template(bad, chat_template=EXTRAS_TEMPLATE, tokenize=False)
    with pytest.raises(ValueError, match="chat template rejected the conversation: unknown role tool"):
        ours.apply_chat_template(bad)  # a one-line error, as every other bad input


def test_template_sources_and_builtin_default(tmp_path):
    conversation = [{"role": "user", "content": [{"type": "image", "image": "x.png"}, {"type": "text", "text": "What is it?"}]}]
    # No template anywhere: the built-in Qwen2.5-VL-style one with MiMo's system prompt.
    plain = Processor.from_pretrained(write_checkpoint(tmp_path / "none", template=None))
    assert plain.chat_template == DEFAULT_CHAT_TEMPLATE
    assert plain.apply_chat_template(conversation) == (
        "<|im_start|>system\nYou are MiMo, an AI assistant developed by Xiaomi.<|im_end|>\n"
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>What is it?<|im_end|>\n"
        "<|im_start|>assistant\n")
    assert "Picture 1: <|vision_start|>" in plain.apply_chat_template(conversation, add_vision_id=True)
    # tokenizer_config.json's template, in its list-of-named-templates form.
    folder = write_checkpoint(tmp_path / "listed", template=None, config_extra={"chat_template": [
        {"name": "tool_use", "template": "TOOLS"}, {"name": "default", "template": "DEFAULT {{ messages | length }}"}]})
    assert Processor.from_pretrained(folder).apply_chat_template(conversation) == "DEFAULT 1"
    # chat_template.jinja wins over chat_template.json.
    folder = write_checkpoint(tmp_path / "jinja")
    (folder / "chat_template.jinja").write_text("JINJA")
    assert Processor.from_pretrained(folder).apply_chat_template(conversation) == "JINJA"


def test_thinking_switches(checkpoint):
    conversation = [{"role": "user", "content": "Hi"}]
    with_image_last = [{"role": "user", "content": [{"type": "text", "text": "Hi"}, {"type": "image", "image": "x.png"}]}]
    processor = Processor.from_pretrained(checkpoint)
    thinking = processor.apply_chat_template(conversation)
    assert thinking.endswith("<|im_start|>assistant\n")
    assert processor.apply_chat_template(conversation, think=False) == thinking + "<think>\n</think>\n"
    with pytest.raises(ValueError, match="add_generation_prompt"):
        processor.apply_chat_template(conversation, add_generation_prompt=False, think=False)
    suffix = Processor.from_pretrained(checkpoint, no_think_style="suffix")
    assert "<|im_start|>user\nHi\n<no_think>\n<|im_end|>" in suffix.apply_chat_template(conversation, think=False)
    assert "<|vision_end|>\n<no_think>\n<|im_end|>" in suffix.apply_chat_template(with_image_last, think=False)
    slash = Processor.from_pretrained(checkpoint, no_think_style="slash")
    assert "<|im_start|>user\nHi /no_think<|im_end|>" in slash.apply_chat_template(conversation, think=False)
    assert conversation == [{"role": "user", "content": "Hi"}]  # the caller's conversation is untouched
    ids = processor([conversation], think=False)["input_ids"][0].tolist()
    think, end_think = (processor.tokenizer.token_to_id(t) for t in ("<think>", "</think>"))
    newline = processor.tokenizer.token_to_id("Ċ")  # byte-level BPE spells a newline as Ċ
    assert ids[-4:] == [think, newline, end_think, newline]


def test_special_token_ids_decode_and_generation_config(checkpoint, tmp_path):
    processor = Processor.from_pretrained(checkpoint)
    assert (processor.image_token_id, processor.video_token_id, processor.vision_start_token_id) == (6, 7, 3)
    assert (processor.pad_token_id, processor.eos_token_id, processor.eos_token_ids) == (0, 2, [2, 0])
    reference = PreTrainedTokenizerFast.from_pretrained(checkpoint)
    text = "<|im_start|>assistant\n<think>\nTwo.\n</think>\nThe answer is 2.<|im_end|>"
    ids = processor.encode(text)
    assert ids == reference(text)["input_ids"]
    for skip in (False, True):
        assert processor.decode(torch.tensor(ids), skip_special_tokens=skip) == reference.decode(ids, skip_special_tokens=skip)
    assert processor.decode(ids, skip_special_tokens=True) == "assistant\n<think>\nTwo.\n</think>\nThe answer is 2."
    folder = write_checkpoint(tmp_path / "gen")
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0, 5]}))
    (folder / "preprocessor_config.json").write_text(json.dumps({"min_pixels": 1000, "max_pixels": 50000}))
    loaded = Processor.from_pretrained(folder)
    assert loaded.eos_token_ids == [2, 0, 5] and (loaded.min_pixels, loaded.max_pixels) == (1000, 50000)


def test_split_thinking():
    assert split_thinking("<think>\nLet me count.\n</think>\n\nThree.") == ("Let me count.", "Three.")
    assert split_thinking("<think>\n</think>\n```json\n[]\n```") == ("", "```json\n[]\n```")
    assert split_thinking("Let me count.\n</think>\nThree.") == ("Let me count.", "Three.")  # prefilled <think>
    assert split_thinking("Three.") == ("", "Three.")
    assert split_thinking("<think>\nStill thinking") == ("Still thinking", "")


def test_video_placeholders_expand_to_grid(checkpoint):
    frames = [np.full((308, 336, 3), 40 * i, np.uint8) for i in range(4)]
    conversation = [{"role": "user", "content": [{"type": "video", "video": frames, "sample_fps": 1.0},
                                                 {"type": "image", "image": frames[0]},
                                                 {"type": "text", "text": "Describe the video."}]}]
    processor = Processor.from_pretrained(checkpoint)
    out = processor(conversation)
    assert out["video_grid_thw"].tolist() == [[2, 22, 24]] and out["image_grid_thw"].tolist() == [[1, 22, 24]]
    assert out["second_per_grid_ts"].tolist() == [2.0]
    assert out["pixel_values_videos"].shape == (2 * 22 * 24, 1176) and out["pixel_values"].shape == (22 * 24, 1176)
    ids = out["input_ids"][0].tolist()
    start = ids.index(3)  # <|vision_start|>, then 2*22*24/4 video tokens, <|vision_end|>
    assert ids[start + 1:start + 1 + 264] == [7] * 264 and ids[start + 1 + 264] == 4
    assert ids.count(7) == 264 and ids.count(6) == 132


def test_save_pretrained_round_trip_loads_in_transformers(checkpoint, images, tmp_path):
    single, multi_turn, _ = conversations(images)
    processor = Processor.from_pretrained(checkpoint)
    processor.save_pretrained(tmp_path / "saved")
    again = Processor.from_pretrained(tmp_path / "saved")
    for key, value in processor([single, multi_turn]).items():
        assert torch.equal(value, again([single, multi_turn])[key])
    assert Qwen2VLImageProcessor.from_pretrained(tmp_path / "saved").max_pixels == processor.max_pixels
    _, theirs = reference_inputs(reference_processor(tmp_path / "saved", QWEN25_VL_TEMPLATE), [single])
    assert_same_inputs(again(single), theirs)


def test_clear_errors(checkpoint, tmp_path):
    with pytest.raises(FileNotFoundError, match="no_such_model"):
        Processor.from_pretrained(tmp_path / "no_such_model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        Processor.from_pretrained(tmp_path / "empty")
    drops_images = Processor.from_pretrained(checkpoint, chat_template="{{ messages[0]['content'][1]['text'] }}")
    with pytest.raises(ValueError, match="0 <\\|image_pad\\|> placeholders but 1 images"):
        drops_images([{"role": "user", "content": [{"type": "image", "image": np.zeros((28, 28, 3), np.uint8)},
                                                   {"type": "text", "text": "hi"}]}])
    processor = Processor.from_pretrained(checkpoint)
    with pytest.raises(ValueError, match="no 'image'"):
        processor([{"role": "user", "content": [{"type": "image"}]}])
    with pytest.raises(ValueError, match="no_think_style"):
        Processor.from_pretrained(checkpoint, no_think_style="never")
    with pytest.raises(ValueError, match="does not parse"):
        Processor.from_pretrained(checkpoint, chat_template="{% if %}")

"""
chat.py — chat with a checkpoint: the command-line interface and the Python chat API.

    python chat.py --model path/to/MiMo-VL-7B-RL --image cat.jpg "What is in this picture?"
    python chat.py --model path/to/MiMo-VL-7B-RL            # multi-turn chat
    python chat.py --model path/to/MiMo-VL-7B-RL-2508 --no-think --preset paper-eval --video clip.mp4 "Summarise."

From Python, with a model and processor loaded from the same folder:

    reply = chat(model, processor, [{"role": "user", "content": "Hi"}])   # Reply(reasoning, answer, truncated)
    for piece in chat_stream(model, processor, conversation): ...          # the reply as it is generated

The chat samples with the checkpoint's generation_config.json unless flags (or arguments) say
otherwise, allows 16384 new tokens by default (reasoning answers are long), picks the no-think
switch from the chat template (processor.py) and prints all three choices with where each came
from. The model, its KV-cache generation and checkpoint loading are mimovl.py's; the chat
template, image / video preprocessing and the thinking switch are processor.py's. This file joins
them: conversation -> prompt tensors -> streamed tokens -> text.
"""

import argparse
import os
import sys
from collections import namedtuple

import torch

import kernels
from mimovl import MiMoVL, check_sampling
from processor import NO_THINK_STYLES, PRESETS, Processor, split_thinking


# -----------------------------------------------------------------------------
# Device and precision

def default_dtype(device):
    """bf16 on GPUs and on CPUs with native bf16 (avx512_bf16 / AMX), fp32 otherwise: fp16 matmul
    on CPUs ran at about 1 GFLOP/s when measured in this project (PyTorch's CPU build)."""
    if torch.device(device).type == "cuda":
        return torch.bfloat16
    return torch.bfloat16 if kernels.cpu_has_native_bf16() else torch.float32


def resolve_device(name=None):
    """A --device value -> torch.device: None picks cuda when there is a GPU, else cpu; a name
    that is no device, or cuda on a machine without one, is a clear error."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ValueError(f"--device {name!r} is not a device; use cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name}: no CUDA GPU is available here; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {name}: this machine has {torch.cuda.device_count()} GPU(s)")
    elif device.type != "cpu":
        raise ValueError(f"--device {name}: only cpu and cuda[:N] are supported")
    return device


# -----------------------------------------------------------------------------
# The chat API: conversation -> streamed text

# Sampling defaults. A flag (or a chat() argument) wins, then the checkpoint's generation_config.json
# (as vLLM, MiMo's evaluation engine, reads it; do_sample=false there means greedy), then these:
# greedy, and 16384 new tokens because MiMo-VL's reasoning answers average about 2.5K tokens and
# run far longer on hard problems (MiMo-VL report §5.1, Fig. 6); a shorter budget cuts answers
# off mid-thought. A default that does not fit the model's context shrinks to the room left.
DEFAULT_GENERATION = {"temperature": 0.0, "top_p": 1.0, "top_k": 0, "max_new_tokens": 16384}


def generation_settings(processor, **overrides):
    """{name: (value, source)} for temperature, top_p, top_k and max_new_tokens; source is
    "override" (a non-None entry of `overrides`), "generation_config.json" or "default"."""
    config = processor.generation_config
    settings = {}
    for name, default in DEFAULT_GENERATION.items():
        if overrides.get(name) is not None:
            settings[name] = (overrides[name], "override")
        elif name == "temperature" and config.get("do_sample") is False:
            settings[name] = (0.0, "generation_config.json (do_sample=false: greedy)")
        elif config.get(name) is not None:
            settings[name] = (config[name], "generation_config.json")
        else:
            settings[name] = (default, "default")
    return settings


def chat_stream(model, processor, conversation, think=True, max_new_tokens=None, temperature=None,
                top_p=None, top_k=None, seed=None, max_pixels=None):
    """Yield the assistant's reply to `conversation` (HF message list) as text pieces. Settings left
    at None come from the checkpoint (generation_settings). The generator returns (StopIteration.value,
    or `yield from`) "length" when the reply stopped at max_new_tokens, else "stop"."""
    settings = generation_settings(processor, max_new_tokens=max_new_tokens, temperature=temperature,
                                   top_p=top_p, top_k=top_k)
    sampling = {name: value for name, (value, _) in settings.items()}
    batch = processor(conversation, add_generation_prompt=True, think=think, max_pixels=max_pixels)
    if settings["max_new_tokens"][1] != "override":      # fit a default into the context
        room = model.cfg.text.max_position_embeddings - batch["input_ids"].shape[1]
        sampling["max_new_tokens"] = max(0, min(sampling["max_new_tokens"], room))
    device, dtype = model.device, model.dtype
    batch = {k: (v.to(device, dtype) if k.startswith("pixel_values") else v.to(device))
             for k, v in batch.items()}
    # Incremental detokenisation (as vLLM's): decode only the tokens since the last piece plus the
    # ones before it as context (decoders join tokens differently at the start), so each step
    # costs O(1), not O(length) as decoding the whole reply would.
    ids, prefix, read, finish = [], 0, 0, "length"
    for tokens, _, finished in model.stream_generate(**batch, **sampling, seed=seed,
                                                     stop_token_ids=processor.eos_token_ids):
        if bool(finished[0]) and int(tokens[0]) in processor.eos_token_ids:
            finish = "stop"
            break
        ids.append(int(tokens[0]))
        before, now = processor.decode(ids[prefix:read]), processor.decode(ids[prefix:])
        if len(now) > len(before) and not now.endswith("\ufffd"):   # else: wait for the next byte
            yield now[len(before):]
            prefix, read = read, len(ids)
    before, now = processor.decode(ids[prefix:read]), processor.decode(ids[prefix:])
    if len(now) > len(before):          # a character that never completed
        yield now[len(before):]
    return finish


def _consume(stream, on_piece=None):
    """Run a chat_stream to its end: (text, finish reason)."""
    pieces = []
    while True:
        try:
            piece = next(stream)
        except StopIteration as stop:
            return "".join(pieces), stop.value
        pieces.append(piece)
        if on_piece:
            on_piece(piece)


Reply = namedtuple("Reply", ["reasoning", "answer", "truncated"])


def chat(model, processor, conversation, **kw):
    """Reply(reasoning, answer, truncated): the reply split at `</think>` (processor.split_thinking);
    truncated is True when it stopped at max_new_tokens, so the answer is cut off or missing.
    `kw` as chat_stream's."""
    text, finish = _consume(chat_stream(model, processor, conversation, **kw))
    return Reply(*split_thinking(text), truncated=finish == "length")


# -----------------------------------------------------------------------------
# The command-line interface

TRUNCATION_NOTE = "[stopped at the new-token limit: the answer may be cut off; raise --max-new-tokens]"


class _ArgumentError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message):          # one line and exit code 2, not argparse's usage block
        raise _ArgumentError(message)


def _read_line(stdin):
    """One line of the interactive chat, or None at the end of input. Bytes are decoded here, so
    a line that is not UTF-8 is reported (ValueError) instead of ending the chat."""
    raw = stdin.buffer.readline() if hasattr(stdin, "buffer") else stdin.readline()
    if not raw:
        return None
    if isinstance(raw, bytes):
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"that line is not valid UTF-8 (byte {e.start}: {e.reason}); type it again") from None
    return raw.strip()


def _one_line(error):
    return " ".join(line.strip() for line in str(error).splitlines() if line.strip())


# What a failed turn or start-up may raise: bad input, unreadable files, missing optional packages,
# out of memory. Anything else is a bug and keeps its traceback.
USER_ERRORS = (ValueError, OSError, ImportError, MemoryError, torch.OutOfMemoryError)


def main(argv=None):
    p = _Parser(description="Chat with a MiMo-VL / Qwen2.5-VL checkpoint about images and videos.")
    p.add_argument("question", nargs="?", help="the question; without it, an interactive multi-turn chat")
    p.add_argument("--model", required=True, help="folder with config.json, *.safetensors, tokenizer.json")
    p.add_argument("--image", action="append", default=[], help="an image file (repeatable)")
    p.add_argument("--video", action="append", default=[], help="a video file or a folder of frames (repeatable)")
    # thinking (MiMo-VL GitHub README, issues #6 / #30)
    p.add_argument("--no-think", action="store_true", help="answer without a reasoning block")
    p.add_argument("--no-think-style", choices=NO_THINK_STYLES, default=None,
                   help="how --no-think tells the model; default: chosen from the chat template "
                        "('slash' when it handles /no_think, else 'prefill')")
    # sampling: default from the checkpoint's generation_config.json, else greedy / 16384 tokens
    p.add_argument("--max-new-tokens", type=int, default=None, help="default: generation_config.json, else 16384")
    p.add_argument("--temperature", type=float, default=None, help="0 = greedy; default: generation_config.json, else 0")
    p.add_argument("--top-p", type=float, default=None, help="in (0, 1]; default: generation_config.json, else 1")
    p.add_argument("--top-k", type=int, default=None, help="0 = off; default: generation_config.json, else 0")
    p.add_argument("--seed", type=int, default=None, help="seed for sampling (temperature > 0); default: random")
    # vision budgets
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="paper-eval: MiMo-VL's evaluation budgets (images <= 4096*28*28 pixels, videos "
                        "at 2 fps, <= 256 frames, <= 16384 video tokens)")
    p.add_argument("--max-pixels", type=int, default=None, help="per-image pixel budget (e.g. 3211264 = 4096*28*28)")
    # precision and device
    p.add_argument("--dtype", choices=["bfloat16", "float32", "float16"], default=None,
                   help="default: bf16 on GPUs and CPUs with native bf16, fp32 otherwise")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N; default: cuda if available, else cpu")
    try:
        args = p.parse_args(argv)
        return _chat_cli(args)
    except _ArgumentError as e:
        print(f"error: {e} (see --help)", file=sys.stderr)
    except USER_ERRORS as e:
        print(f"error: {_one_line(e)}", file=sys.stderr)
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    return 2


def _chat_cli(args):
    # everything that needs no model is checked first
    check_sampling(0 if args.temperature is None else args.temperature, args.top_k or 0,
                   1 if args.top_p is None else args.top_p, args.max_new_tokens or 0, flags=True)
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens={args.max_new_tokens}: must be at least 1")
    if args.max_pixels is not None and args.max_pixels < 1:
        raise ValueError(f"--max-pixels={args.max_pixels}: must be a positive number of pixels")
    if args.question is not None and not args.question.strip():
        raise ValueError("the question is empty; ask something, or leave it out for an interactive chat")
    for kind, paths in (("image", args.image), ("video", args.video)):
        for path in paths:
            if not os.path.exists(path):
                raise FileNotFoundError(f"--{kind} {path!r} does not exist")
    device = resolve_device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else default_dtype(device)   # --dtype choices are torch names
    processor = Processor.from_pretrained(args.model, no_think_style=args.no_think_style)
    preset = PRESETS.get(args.preset, {})
    max_pixels = args.max_pixels or preset.get("max_pixels")
    media = [{"type": "image", "image": x} for x in args.image] + \
            [{"type": "video", "video": x, **preset.get("video", {})} for x in args.video]
    overrides = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                     top_k=args.top_k)
    settings = generation_settings(processor, **overrides)
    print("sampling: " + ", ".join(
        f"{name}={value} ({'--' + name.replace('_', '-') if source == 'override' else source})"
        for name, (value, source) in settings.items()), file=sys.stderr)
    if args.no_think:
        print(f"thinking: off, style '{processor.no_think_style}' ({processor.no_think_reason})", file=sys.stderr)
    else:
        print("thinking: on (--no-think turns it off)", file=sys.stderr)
    if args.preset:
        print(f"preset {args.preset}: max_pixels={max_pixels}, video {preset.get('video')}", file=sys.stderr)
    print(f"loading {args.model} on {device} in {str(dtype).replace('torch.', '')}", file=sys.stderr)
    model = MiMoVL.from_pretrained(args.model, dtype=dtype, device=device)
    if device.type == "cpu" and model.prepare_for_cpu_inference():  # fused + oneDNN-packed (bench.py --cpu)
        print("linear weights fused and packed for oneDNN bf16", file=sys.stderr)
    gen = dict(think=not args.no_think, seed=args.seed, max_pixels=max_pixels, **overrides)
    conversation = []

    def ask(question):
        # images/videos go before the text, in the first turn (the Qwen2.5-VL chat format)
        content = (media if not conversation else []) + [{"type": "text", "text": question}]
        turn = [*conversation, {"role": "user", "content": content}]
        reply, finish = _consume(chat_stream(model, processor, turn, **gen),
                                 lambda piece: print(piece, end="", flush=True))
        print()
        if finish == "length":
            print(TRUNCATION_NOTE, file=sys.stderr)
        conversation.extend([turn[-1], {"role": "assistant", "content": reply}])

    if args.question is not None:
        ask(args.question)
        return 0
    print("multi-turn chat; an empty line or Ctrl-D quits", file=sys.stderr)
    while True:
        print("> ", end="", flush=True)
        try:
            q = _read_line(sys.stdin)
            if not q:
                return 0
            ask(q)
        except USER_ERRORS as e:          # a bad line or a failed turn: say so, keep chatting
            print(f"error: {_one_line(e)}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())

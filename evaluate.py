"""
evaluate.py — held-out evaluation for both training scripts: greedy answers to held-out samples
scored with the rewards of rewards.py (one convention for training and evaluation), the
no-image baselines (the most frequent answer; the same model given black images) and the tables.

    python evaluate.py runs/pretrain/stage4                        # the synthetic held-out suite
    python evaluate.py runs/pretrain/stage4 --tasks count,ocr --n 32
    python evaluate.py runs/rl/final --jsonl my_benchmark.jsonl --out records.jsonl
    torchrun --nproc_per_node=2 evaluate.py runs/pretrain/stage4    # each process scores a share

MODEL_DIR is any Hugging Face folder this project loads (config.json, safetensors, tokenizer).
A JSONL line holds `messages` (a conversation; a final assistant turn is dropped) and `answer`,
optionally `task` (rows of the table) and `scorer` (exact, numeric, count, choice, box, point,
span; guessed from the answer otherwise). The protocol follows the MiMo-VL report §4.1 at
small scale: greedy decoding, one answer per item.
"""

import json
import os
import re
import sys
from collections import Counter

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

import packing
import synthetic
import training
from processor import VIDEO_KEYS, fetch_video, load_image
from rewards import (DATA_REWARDS, MathVerifyMissing, choice_reward, count_reward, ground_reward,
                     math_reward, ocr_reward, parse_span, passed, point_reward, require_math_verify,
                     reward_tag, temporal_iou_reward)


# -----------------------------------------------------------------------------
# 1. Evaluation: greedy answers on held-out tasks, scorers, baselines
#
# The protocol of the MiMo-VL report §4.1 at small scale: greedy decoding, one answer per item.
# A scorer takes the model's full response and the ground truth and returns a dict of metrics
# in [0, 1]. Every scorer is a reward of rewards.py read as a metric, so an answer is read
# (after </think>, the last \boxed{}, ...) and judged exactly as in RL; rewards.py documents the
# conventions (boxes [x1, y1, x2, y2] in pixels with x2/y2 exclusive, spans in seconds, math
# equivalence). A malformed ground truth raises a ValueError naming it.

def score_exact(response, answer):
    """Exact text match after normalisation (captions, OCR): rewards.ocr_reward."""
    return {"acc": ocr_reward(response, str(answer))[0]}


def score_numeric(response, answer):
    """Math answers (arithmetic, visual math): rewards.math_reward."""
    return {"acc": math_reward(response, str(answer))[0]}


def score_count(response, answer):
    """Counting: rewards.count_reward (one number, digits or words)."""
    return {"acc": count_reward(response, answer)[0]}


def score_choice(response, answer):
    """Multiple choice (a letter or a number): rewards.choice_reward."""
    return {"acc": choice_reward(response, answer)[0]}


def score_box(response, answer):
    """Grounding: IoU of the predicted box(es) with the ground truth (matched as
    rewards.ground_reward matches them) and Acc@0.5, the share with IoU >= 0.5."""
    iou = ground_reward(response, answer)[1]["iou"]
    return {"acc@0.5": float(iou >= 0.5), "iou": iou}


def score_point(response, answer):
    """Pointing: the point falls inside the ground-truth box (rewards.point_reward)."""
    return {"acc": point_reward(response, answer)[0]}


def score_span(response, answer):
    """Temporal grounding: IoU of the predicted span with the truth (rewards.temporal_iou_reward)
    and Acc@0.5."""
    tiou = temporal_iou_reward(response, answer)[0]
    return {"tiou": tiou, "acc@0.5": float(tiou >= 0.5)}


SCORERS = {"exact": score_exact, "numeric": score_numeric, "count": score_count,
           "choice": score_choice, "box": score_box, "point": score_point, "span": score_span}
TASK_SCORER = {"caption": "exact", "count": "count", "video_count": "count", "ocr": "exact",
               "visual_math": "numeric", "text_math": "numeric", "compare": "choice",
               "ground_box": "box", "ground_point": "point", "video_grounding": "span"}
MAX_NEW_TOKENS = {"count": 8, "video_count": 8, "compare": 8, "ocr": 16, "caption": 48,
                  "ground_box": 48, "ground_point": 40, "video_grounding": 24,
                  "visual_math": 112, "text_math": 128}


def _name(sample):
    return sample.get("eval_name", sample.get("task", "data"))


_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def scorer_for(sample):
    """A sample's scorer: its `scorer` field, else by task, else guessed from the answer."""
    name = sample.get("scorer") or TASK_SCORER.get(sample.get("task"))
    if name is None:
        a = sample["answer"]
        if isinstance(a, list) and len(a) == 4:
            name = "box"
        elif isinstance(a, (int, float)) or isinstance(a, str) and _NUMBER.fullmatch(a.strip()):
            name = "numeric"
        elif isinstance(a, list) and len(a) == 2 or isinstance(a, str) and parse_span(a):
            name = "span"
        elif isinstance(a, str) and re.fullmatch(r"[A-Za-z]", a.strip()):
            name = "choice"
        else:
            name = "exact"
    if name not in SCORERS:
        raise ValueError(f"unknown scorer {name!r}; choose from {', '.join(SCORERS)}")
    return name


def answer_text(answer, scorer):
    """The response that states `answer` (used for the majority-answer baseline)."""
    if scorer == "box":
        return json.dumps([{"bbox_2d": [int(x) for x in answer]}])
    if scorer == "point":
        x1, y1, x2, y2 = answer
        return json.dumps([{"point_2d": [(x1 + x2) // 2, (y1 + y2) // 2]}])
    if scorer == "span" and not isinstance(answer, str):
        return "[" + ",".join(f"{int(s) // 60:02d}:{int(s) % 60:02d}" for s in answer) + "]"
    return str(answer)


def blank_sample(sample):
    """The same sample with every image and every video frame black, at the same sizes."""
    def blank(item):
        if item.get("type") == "image" or "image" in item:
            return {**item, "image": Image.new("RGB", load_image(item["image"]).size)}
        if item.get("type") == "video" or "video" in item:
            if isinstance(item["video"], np.ndarray):
                return {**item, "video": np.zeros_like(item["video"])}
            frames, fps = fetch_video(item["video"], **{k: item[k] for k in VIDEO_KEYS if k in item})
            t, _, h, w = frames.shape
            return {"type": "video", "video": [Image.new("RGB", (w, h))] * t, "sample_fps": fps,
                    "resized_height": h, "resized_width": w}
        return item
    out = dict(sample)
    out["messages"] = [{**m, "content": m["content"] if isinstance(m["content"], str)
                        else [blank(i) for i in m["content"]]} for m in sample["messages"]]
    return out


def _prompt_of(sample):
    """The conversation up to the answer: drop a final assistant turn if the sample has one."""
    msgs = sample["messages"]
    return msgs[:-1] if msgs and msgs[-1]["role"] == "assistant" else msgs


@torch.no_grad()
def generate_answers(model, processor, samples, batch_size=32, max_new_tokens=None, progress=False):
    """Greedy responses (strings) for a list of samples. Batches hold one task each, so that
    prompts have similar lengths and a batch stops as soon as its short answers are done.
    progress=True shows a bar over the batches."""
    model.eval()
    responses = [None] * len(samples)
    by_task = {}
    for i, s in enumerate(samples):
        by_task.setdefault(_name(s), []).append(i)
    batches = [ids[a:a + batch_size] for ids in by_task.values() for a in range(0, len(ids), batch_size)]
    for idx in tqdm(batches, desc="generating", unit="batch", disable=not progress, dynamic_ncols=True):
        batch = processor([_prompt_of(samples[i]) for i in idx])
        n_new = max_new_tokens or max(MAX_NEW_TOKENS.get(samples[i].get("task"), 64) for i in idx)
        kw = {k: v.to(model.device) if k.startswith("pixel") else v for k, v in batch.items()
              if k not in ("input_ids", "attention_mask")}
        out = model.generate(batch["input_ids"].to(model.device),
                             attention_mask=batch["attention_mask"].to(model.device),
                             max_new_tokens=n_new, stop_token_ids=processor.eos_token_ids, **kw)
        for row, i in zip(out.tolist(), idx):
            cut = next((j for j, t in enumerate(row) if t in processor.eos_token_ids), len(row))
            responses[i] = processor.decode(row[:cut], skip_special_tokens=True)
    return responses


def evaluate(model, processor, samples, batch_size=32, max_new_tokens=None, blank=False, progress=False):
    """Score `samples` (dicts with "messages", "answer", optionally "task"/"scorer"): greedy
    generation with model.generate, one scorer per sample (scorer_for). Returns
    {"by_task": {task: {metric: mean, "n": count}}, "records": [per-sample dicts]}.
    blank=True replaces every image/video by black pixels first (the no-image baseline)."""
    if blank:
        samples = [blank_sample(s) for s in samples]
    responses = generate_answers(model, processor, samples, batch_size, max_new_tokens, progress)
    records = []
    for s, r in zip(samples, responses):
        name = scorer_for(s)
        records.append({"task": _name(s), "scorer": name,
                        "response": r, "answer": s["answer"], **SCORERS[name](r, s["answer"])})
    return {"by_task": summarise(records), "records": records}


def summarise(records):
    by = {}
    for r in records:
        by.setdefault(r["task"], []).append(r)
    out = {}
    for task, rs in by.items():
        metrics = [k for k in rs[0] if k not in ("task", "scorer", "response", "answer")]
        out[task] = {"n": len(rs), "scorer": rs[0]["scorer"],
                     **{m: sum(r[m] for r in rs) / len(rs) for m in metrics}}
    return out


def majority_baseline(samples, answers=None):
    """Per task: the score of always giving one answer — answers[task] (e.g. the most frequent
    answer of the training split, majority_answers) or else the most frequent answer among
    `samples` themselves (which flatters the baseline on small sets)."""
    by = {}
    for s in samples:
        by.setdefault(_name(s), []).append(s)
    records = []
    for task, ss in by.items():
        scorer = scorer_for(ss[0])
        if answers and task in answers:
            common = answers[task]
        else:
            common = json.loads(Counter(json.dumps(s["answer"]) for s in ss).most_common(1)[0][0])
        pred = answer_text(common, scorer)
        records += [{"task": task, "scorer": scorer, **SCORERS[scorer](pred, s["answer"])} for s in ss]
    return summarise(records)


def majority_answers(suite, n=500, seed=0):
    """The most frequent answer of each suite task in n training samples (not rendered)."""
    out = {}
    for name, task, d in suite:
        answers = Counter(json.dumps(synthetic.make_sample(task, i, "train", seed, d, render=False)["answer"])
                          for i in range(n))
        out[name] = json.loads(answers.most_common(1)[0][0])
    return out


@torch.no_grad()
def answer_loss(model, processor, samples, max_tokens=4096):
    """Teacher-forced next-token loss on the reference answers: (sum of nats, labelled tokens).
    The samples are packed into rows of max_tokens (packing is exact, see packing.py)."""
    model.eval()
    encoded = [packing.encode_sample(s, processor) for s in samples]
    total, count = 0.0, 0
    if not encoded:
        return total, count
    for rows in packing.best_fit_pack([len(e["input_ids"]) for e in encoded],
                                   max(max_tokens, *(len(e["input_ids"]) for e in encoded))):
        row = packing.collate_packed([encoded[i] for i in rows])
        n = int((row["labels"][:, 1:] != packing.IGNORE_INDEX).sum())
        out = model(row["input_ids"].to(model.device), labels=row["labels"].to(model.device),
                    cu_seqlens=row["cu_seqlens"].to(model.device), **packing.vision_inputs(row, model.device))
        total += float(out.loss) * n
        count += n
    return total, count


# The held-out suite of the small-scale reproduction: (name, task, difficulty).
EVAL_SUITE = (
    ("caption_big", "caption", synthetic.BIG_SHAPE),
    ("caption", "caption", synthetic.Difficulty()),
    ("count", "count", synthetic.Difficulty()),
    ("count_224px", "count", synthetic.LARGE),
    ("ground_box", "ground_box", synthetic.Difficulty()),
    ("ocr", "ocr", synthetic.Difficulty()),
    ("visual_math", "visual_math", synthetic.Difficulty()),
    ("visual_math_long", "visual_math", synthetic.LONG),
    ("text_math", "text_math", synthetic.Difficulty()),
    ("video_grounding", "video_grounding", synthetic.Difficulty()),
    ("compare", "compare", synthetic.Difficulty()),
)
PRIMARY_METRICS = {"exact": ("acc",), "numeric": ("acc",), "count": ("acc",), "choice": ("acc",),
                   "box": ("acc@0.5", "iou"), "point": ("acc",), "span": ("tiou", "acc@0.5")}
TEXT_ONLY_TASKS = ("text_math",)


# Open-ended tasks measured by the loss of the reference answer (the data stages 1-2 add).
LOSS_SUITE = (
    ("caption", "caption", synthetic.Difficulty()),
    ("interleaved", "interleaved", synthetic.Difficulty()),
)


def eval_suites(names=None):
    """(EVAL_SUITE, LOSS_SUITE) restricted to the comma-separated names of --eval-tasks."""
    if not names:
        return EVAL_SUITE, LOSS_SUITE
    want = {n.strip() for n in names.split(",")}
    known = {e[0] for e in EVAL_SUITE + LOSS_SUITE}
    if want - known:
        raise SystemExit(f"--eval-tasks: unknown {sorted(want - known)}; choose from {sorted(known)}")
    return tuple(e for e in EVAL_SUITE if e[0] in want), tuple(e for e in LOSS_SUITE if e[0] in want)


def heldout_suite(n, seed=0, suite=EVAL_SUITE):
    """n held-out samples of every (name, task, difficulty) of `suite`, tagged with eval_name."""
    out = []
    for name, task, d in suite:
        for i in range(n):
            s = synthetic.make_sample(task, i, "heldout", seed, d)
            s["eval_name"] = name
            out.append(s)
    return out


def run_suite(model, processor, samples, compute, batch_size=32, majority=None, loss_samples=(),
              progress=False, max_new_tokens=None):
    """Greedy scores of the model on `samples`, beside the majority answer (`majority`: {task:
    answer}, see majority_answers; else the samples' own mode) and the model given black images;
    answer losses (real and blank images) on `loss_samples`. Each rank scores its share."""
    r, w = compute.rank, compute.world_size
    bar = progress and compute.master
    mine = samples[r::w]
    real = evaluate(model, processor, mine, batch_size, max_new_tokens, progress=bar)["records"]
    with_image = [s for s in mine if _name(s) not in TEXT_ONLY_TASKS]
    blank = evaluate(model, processor, with_image, batch_size, max_new_tokens, blank=True,
                     progress=bar)["records"]
    real = sum(training.gather_objects(real, compute), [])
    blank = sum(training.gather_objects(blank, compute), [])
    losses = {}
    for name in dict.fromkeys(_name(s) for s in loss_samples):
        part = [s for s in loss_samples if _name(s) == name][r::w]
        sums = torch.tensor([*answer_loss(model, processor, part),
                             *answer_loss(model, processor, [blank_sample(s) for s in part])],
                            dtype=torch.float64)
        sums = training.all_reduce_sum(sums.to(compute.device), compute).tolist()
        losses[name] = {"model": sums[0] / max(sums[1], 1), "blank": sums[2] / max(sums[3], 1)}
    return {"model": summarise(real), "blank": summarise(blank),
            "majority": majority_baseline(samples, majority), "loss": losses,
            "examples": {x["task"]: {"response": x["response"], "answer": x["answer"]} for x in real}}


def format_results(res, title):
    lines = [title, f"{'task':<18} {'metric':<8} {'model':>6} {'majority':>9} {'blank img':>9}   n",
             "-" * 62]
    for task, m in res["model"].items():
        for k in PRIMARY_METRICS[m["scorer"]]:
            maj = res["majority"].get(task, {}).get(k, float("nan"))
            bl = res["blank"].get(task, {}).get(k)
            lines.append(f"{task:<18} {k:<8} {m[k]:>6.3f} {maj:>9.3f} "
                         f"{'-' if bl is None else f'{bl:.3f}':>9}   {m['n']}")
    for task, l in res.get("loss", {}).items():
        lines.append(f"{task:<18} {'loss':<8} {l['model']:>6.3f} {'-':>9} {l['blank']:>9.3f}")
    return "\n".join(lines)


def stages_table(results):
    """Markdown over pre-training stages ({stage key: run_suite result}): every metric after each
    stage 1-4, beside the baselines of the last one; stage 0's measurements above it. None if
    no stage 1-4 was evaluated."""
    keys = [k for k in ("1", "2", "3", "4") if k in results]
    if not keys:
        return None

    def cell(x):
        return "-" if x is None or x != x else f"{x:.2f}"
    last = results[keys[-1]]
    lines = []
    if "0-lm" in results:
        lines.append(f"- stage 0-lm: held-out text loss {results['0-lm']['text_loss']:.3f} nats/token")
    if "0-vit" in results:
        lines.append(f"- stage 0-vit: held-out cell accuracy {results['0-vit']['cell_acc']:.3f} "
                     f"(always 'empty': {results['0-vit']['majority']:.3f})")
    lines += ["", "| task | metric | " + " | ".join(f"stage {k}" for k in keys) + " | majority | blank image |",
              "|" + "---|" * (len(keys) + 4)]
    for task, m in last["model"].items():
        for metric in PRIMARY_METRICS[m["scorer"]]:
            vals = [cell(results[k]["model"].get(task, {}).get(metric)) for k in keys]
            lines.append(f"| {task} | {metric} | " + " | ".join(vals) + f" | "
                         f"{cell(last['majority'].get(task, {}).get(metric))} | "
                         f"{cell(last['blank'].get(task, {}).get(metric))} |")
    for task, l in last.get("loss", {}).items():
        lines.append(f"| {task} | loss (nats) | " +
                     " | ".join(cell(results[k].get("loss", {}).get(task, {}).get("model")) for k in keys) +
                     f" | - | {cell(l['blank'])} |")
    return "\n".join(lines)


# -----------------------------------------------------------------------------
# 2. RL evaluation: held-out reward per task and the before/after table

def has_media(prompt):
    return any(isinstance(m["content"], list) and any(
        it.get("type") in ("image", "video") for it in m["content"]) for m in prompt["messages"])


def evaluate_rewards(model, processor, prompts, compute, pool, batch_size=32, blank=False):
    """Greedy responses (generate_answers, each task's response budget) to the
    held-out prompts, scored by the reward router -> ({task: {reward, pass, length, n}}, records).
    Each rank answers its share, in the weights' dtype (as the rollouts). blank=True blacks out
    every image and video first (the no-image baseline; text-only prompts are skipped);
    responses are still judged against the real prompt and ground truth."""
    mine = prompts[compute.rank::compute.world_size]
    if blank:
        mine = [p for p in mine if has_media(p)]
    samples = [blank_sample(p) for p in mine] if blank else mine
    responses = generate_answers(model, processor, samples, batch_size) if samples else []
    items = [(reward_tag(p), r, p["answer"],
              {"messages": p["messages"]} if reward_tag(p) in pool.inline_tasks else {})
             for p, r in zip(mine, responses)]
    records = [{"task": p["task"], "reward": rw, "pass": float(passed(it[0], rw)),
                "length": len(processor.encode(r)), "response": r, "answer": p["answer"]}
               for p, r, it, (rw, _) in zip(mine, responses, items, pool.score(items))]
    records = sum(training.gather_objects(records, compute), [])
    return summarise_rewards(records), records


def summarise_rewards(records):
    by = {}
    for r in records:
        by.setdefault(r["task"], []).append(r)
    return {task: {"reward": sum(r["reward"] for r in rs) / len(rs),
                   "pass": sum(r["pass"] for r in rs) / len(rs),
                   "length": sum(r["length"] for r in rs) / len(rs), "n": len(rs)}
            for task, rs in by.items()}


def mean_reward(res, tasks):
    vals = [res[t]["reward"] for t in tasks if t in res]
    return sum(vals) / len(vals) if vals else float("nan")


def rl_tag_of(task):
    """The data reward name of a task (its prompts all share it)."""
    return synthetic.make_sample(task, 0, "heldout", 0, render=False).get("reward", "reward_model")


def results_table(sft, rl, blank, trained, sft_sampled=None, rl_sampled=None, k=0):
    """Markdown: per task the held-out reward (greedy, and avg@k when sampled results are
    given), pass rate and response length, before and after; the means over the trained tasks
    and over all tasks (so interference with the untrained ones shows)."""
    sampled = bool(sft_sampled and rl_sampled)
    head = "| task | reward | SFT | RL | change |"
    if sampled:
        head += f" SFT avg@{k} | RL avg@{k} | change |"
    head += " SFT pass | RL pass | SFT len | RL len | no-image (SFT) | trained |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]

    def cells(a, b, task):
        x, y = a.get(task), b.get(task)
        if x is None or y is None:
            return "- | - | - |"
        return f"{x['reward']:.3f} | {y['reward']:.3f} | {y['reward'] - x['reward']:+.3f} |"
    for task in sft:
        s, r, b = sft[task], rl.get(task), blank.get(task)
        tag = DATA_REWARDS.get(rl_tag_of(task), "?")
        row = f"| {task} | {tag} | {cells(sft, rl, task)}"
        if sampled:
            row += f" {cells(sft_sampled, rl_sampled, task)}"
        row += (f" {s['pass']:.2f} | {r['pass']:.2f} | {s['length']:.0f} | {r['length']:.0f} |" if r
                else f" {s['pass']:.2f} | - | {s['length']:.0f} | - |")
        row += f" {'-' if b is None else format(b['reward'], '.3f')} | {'yes' if task in trained else 'no'} |"
        lines.append(row)

    def mean_cells(a, b, tasks):
        x, y = mean_reward(a, tasks), mean_reward(b, tasks)
        return f"{x:.3f} | {y:.3f} | {y - x:+.3f} |"
    for name, tasks in (("trained tasks", trained), ("all tasks", list(sft))):
        if not tasks:
            continue
        row = f"| **mean over {name}** | | {mean_cells(sft, rl, tasks)}"
        if sampled:
            row += f" {mean_cells(sft_sampled, rl_sampled, tasks)}"
        lines.append(row + " | | | | | |")
    return "\n".join(lines)


# -----------------------------------------------------------------------------
# 3. Command line: evaluate any HF folder on the held-out suite or a JSONL file

def _fail(message):
    print(f"evaluate.py: {message}", file=sys.stderr)
    raise SystemExit(2)


def _jsonl_samples(path, n):
    """The first n samples of a JSONL file that carry an `answer`, each checked against its own
    scorer (answer_text(answer) must score as right), so a malformed answer fails before any
    generation rather than scoring 0."""
    try:
        samples = [s for s in packing.JsonlDataset(path) if s.get("answer") is not None][:n]
    except packing.DataError as e:
        _fail(str(e))
    if not samples:
        _fail(f"{path}: no line has an `answer` field to score against")
    for i, s in enumerate(samples):
        try:
            name = scorer_for(s)
            SCORERS[name](answer_text(s["answer"], name), s["answer"])
        except (ValueError, TypeError, KeyError) as e:
            _fail(f"{path}: answer #{i + 1} ({str(s['answer'])[:60]!r}) cannot be scored: {e}; "
                  f"give a `scorer` field ({', '.join(SCORERS)}) or fix the answer")
    return samples


def _print_summary(summary, title, compute):
    compute.print(title)
    for task, m in summary.items():
        compute.print(f"  {task:<20} {m['scorer']:<8} " + "  ".join(
            f"{k} {m[k]:.3f}" for k in PRIMARY_METRICS[m["scorer"]]) + f"  n {m['n']}")


def main(argv=None):
    import argparse
    from mimovl import MiMoVL
    from processor import Processor
    p = argparse.ArgumentParser(description="Held-out evaluation of a MiMo-VL folder: greedy answers "
                                "scored with the rewards of rewards.py.")
    p.add_argument("model", metavar="MODEL_DIR", help="a Hugging Face model folder (config.json, "
                   "weights, tokenizer), e.g. runs/pretrain/stage4")
    p.add_argument("--jsonl", default=None, help="score this JSONL file (lines with messages and "
                   "answer; optional task, scorer) instead of the synthetic held-out suite")
    p.add_argument("--n", type=int, default=None, help="suite: items per task (default 64); "
                   "--jsonl: the first N lines with an answer (default all)")
    p.add_argument("--tasks", default=None, help="suite: comma-separated task names (default all: "
                   + ",".join(dict.fromkeys(e[0] for e in EVAL_SUITE + LOSS_SUITE)) + ")")
    p.add_argument("--seed", type=int, default=0, help="suite: the synthetic world's seed "
                   "(train_pretrain.py --seed)")
    p.add_argument("--batch-size", type=int, default=64, help="prompts per generation batch")
    p.add_argument("--max-new-tokens", type=int, default=None, help="response budget (default: the "
                   "synthetic tasks' own, 64 for other tasks; a thinking model needs thousands)")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto")
    p.add_argument("--out", default=None, help="with --jsonl: write every scored record (response, "
                   "answer, metrics) to this JSONL file")
    args = p.parse_args(argv)
    if not os.path.isfile(os.path.join(args.model, "config.json")):
        _fail(f"{args.model}: not a model folder (no config.json); pass a Hugging Face folder such "
              f"as a stage folder written by train_pretrain.py")
    for flag, value in (("--n", args.n), ("--max-new-tokens", args.max_new_tokens)):
        if value is not None and value < 1:
            _fail(f"{flag} must be >= 1, got {value}")
    if args.out and not args.jsonl:
        _fail("--out writes the records of a --jsonl evaluation; the suite logs one example per task")
    known = list(dict.fromkeys(e[0] for e in EVAL_SUITE + LOSS_SUITE))
    unknown = sorted({t.strip() for t in (args.tasks or "").split(",") if t.strip()} - set(known))
    if unknown:
        _fail(f"--tasks: unknown {unknown}; choose from {', '.join(known)}")
    suite, losses = eval_suites(args.tasks)
    try:
        samples = _jsonl_samples(args.jsonl, args.n) if args.jsonl else None
        if samples is None and any(TASK_SCORER[task] == "numeric" for _, task, _ in suite):
            require_math_verify()
    except MathVerifyMissing as e:
        _fail(str(e))
    compute = training.compute_init(args.device)
    model = MiMoVL.from_pretrained(args.model, dtype=compute.eval_dtype, device=compute.device,
                                   progress=False).eval()
    processor = Processor.from_pretrained(args.model)
    if samples is not None:
        mine = samples[compute.rank::compute.world_size]
        records = evaluate(model, processor, mine, args.batch_size, args.max_new_tokens,
                           progress=compute.master)["records"]
        records = sum(training.gather_objects(records, compute), [])
        _print_summary(summarise(records), f"{args.jsonl}: {len(samples)} items, greedy", compute)
    else:
        n = args.n or 64
        res = run_suite(model, processor, heldout_suite(n, args.seed, suite), compute, args.batch_size,
                        majority_answers(suite, seed=args.seed), heldout_suite(n, args.seed, losses),
                        progress=True, max_new_tokens=args.max_new_tokens)
        compute.print(format_results(res, f"{args.model}: held-out suite, {n} items per task, greedy"))
        return
    if args.out and compute.master:
        with open(args.out, "w") as f:
            for r in records:
                f.write(json.dumps(r, default=str) + "\n")
        compute.print(f"wrote {len(records)} records to {args.out}")


if __name__ == "__main__":
    main()

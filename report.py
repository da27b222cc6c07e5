"""
report.py — what a reproduction looks like: one Markdown page with plots and tables, made from
the files the training scripts write, for a person who should not have to read JSONL.

    pip install -e ".[report]"                   # matplotlib (only the report needs it)
    python report.py                             # runs/pretrain (+ runs/rl when present) -> runs/report/report.md
    python report.py --pretrain runs/pretrain --rl runs/rl --out runs/report \\
        --ablation runs/pretrain-noreason --compare runs/rl     # + the two side experiments
    # from Python (the main job, `train_rl.py --all`, ends with this call)
    from report import write_report; write_report("runs/pretrain", "runs/rl", "runs/report")

What it reads (all optional except the pre-training folder; a part that is missing is named in
the report with the command that makes it, so a run still in progress can be reported):

    <pretrain>/metrics.jsonl        one line per optimiser step: stage, step, loss, lr, ...   (train_pretrain.py)
    <pretrain>/eval.jsonl           one line per evaluated stage: model / majority / blank scores, examples
    <pretrain>/stage*/pretrain_stage.json   the stage's settings and the run's arguments
    <rl>/metrics.jsonl              one line per RL step: reward, per-task rewards, ...       (train_rl.py)
    <rl>/eval.jsonl                 held-out reward every --eval-every steps
    <rl>/final/rl.json              before/after rewards, the table, example answers
    <ablation>/eval.jsonl           train_pretrain.py --no-reasoning-data (the reasoning-data ablation)
    <compare>/<algo>/eval.jsonl, eval_sft.json     train_rl.py --compare (on-policy vs vanilla GRPO)

What it writes (<out>): report.md, loss.png (loss per stage with the stage boundaries),
heldout.png (held-out score per task after each stage beside the majority-answer and blank-image
baselines), ablation.png, rl_rewards.png (per-task reward over RL steps), rl_before_after.png,
compare.png, and samples/*.png: the images of a few held-out answers, regenerated from the
synthetic world (evaluation records keep the answer, not the pixels).
"""

import argparse
import json
import math
import os
import time

import synthetic
from processor import load_image
from evaluate import EVAL_SUITE, PRIMARY_METRICS, stages_table
from train_pretrain import STAGE_ORDER
from training import JsonlLog

MATPLOTLIB_HINT = 'the report\'s plots need matplotlib: pip install -e ".[report]"'


def pyplot():
    """matplotlib.pyplot with the Agg backend (files only, no display), imported on first use."""
    try:
        import matplotlib
    except ImportError:
        raise ImportError(MATPLOTLIB_HINT) from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


# -----------------------------------------------------------------------------
# 1. Reading the run folders

def read_jsonl(path):
    """Records of a JSONL log ([] if it does not exist); a line cut short (a run still being
    written, or a crash) is skipped, as training.JsonlLog reads it."""
    return JsonlLog(path).records()


def read_json(path):
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not JSON ({e.msg})") from None


def load_pretrain(folder):
    """A pre-training run: {"metrics": {stage: [records by step]}, "evals": {stage: record},
    "stages": {stage: pretrain_stage.json}}, stages in the recipe's order. A resumed run logs
    the steps after its last checkpoint twice; the later record wins (as for evaluations)."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"pre-training folder not found: {folder} (run `python train_pretrain.py` "
                                "or pass --pretrain DIR)")
    by_stage = {}
    for rec in read_jsonl(os.path.join(folder, "metrics.jsonl")):
        by_stage.setdefault(str(rec["stage"]), {})[rec["step"]] = rec
    evals = {}
    for rec in read_jsonl(os.path.join(folder, "eval.jsonl")):
        evals[str(rec["stage"])] = rec
    stages = {}
    for key in STAGE_ORDER:
        info = read_json(os.path.join(folder, f"stage{key}", "pretrain_stage.json"))
        if info is not None:
            stages[key] = info
    order = [k for k in STAGE_ORDER if k in by_stage] + sorted(k for k in by_stage if k not in STAGE_ORDER)
    return {"folder": folder,
            "metrics": {k: [by_stage[k][s] for s in sorted(by_stage[k])] for k in order},
            "evals": {k: evals[k] for k in [*STAGE_ORDER, *sorted(evals)] if k in evals},
            "stages": stages}


def load_rl(folder):
    """An RL run: step metrics, the held-out curve (eval.jsonl), the SFT baseline (eval_sft.json),
    the final result (final/rl.json) and the final folder's record (its arguments)."""
    return {"folder": folder,
            "metrics": read_jsonl(os.path.join(folder, "metrics.jsonl")),
            "curve": read_jsonl(os.path.join(folder, "eval.jsonl")),
            "sft": read_json(os.path.join(folder, "eval_sft.json")),
            "result": read_json(os.path.join(folder, "final", "rl.json")),
            "record": read_json(os.path.join(folder, "final", "pretrain_stage.json"))}


def primary_metric(scores):
    """The first primary metric of a task's scorer (acc, acc@0.5, tiou ...)."""
    return PRIMARY_METRICS[scores["scorer"]][0]


def moving_average(values, window):
    """Trailing mean over up to `window` values (the first points average what exists)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


# -----------------------------------------------------------------------------
# 2. The plots. Each returns its matplotlib figure, so tests can read the drawn data.

def plot_losses(metrics):
    """Training loss per stage on one step axis, stage boundaries marked; the LR below.
    metrics: {stage: [records]} (load_pretrain). One labelled curve ("stage K") per stage: the
    moving average; the raw loss behind it, faint. 0-vit's loss is its cell classifier's."""
    plt = pyplot()
    fig, (ax, ax_lr) = plt.subplots(2, 1, figsize=(10, 6), sharex=True, height_ratios=(3, 1))
    start = 0
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (key, recs) in enumerate(metrics.items()):
        x = [start + r["step"] for r in recs]
        loss = [r["loss"] for r in recs]
        c = colours[i % len(colours)]
        ax.plot(x, loss, color=c, alpha=0.25, linewidth=0.8, label="_raw")
        ax.plot(x, moving_average(loss, 10), color=c, linewidth=1.8, label=f"stage {key}")
        ax_lr.plot(x, [r["lr"] for r in recs], color=c)
        for a in (ax, ax_lr):
            a.axvline(start, color="grey", linestyle=":", linewidth=1)
        ax.text(start, 1.01, f" {key}", transform=ax.get_xaxis_transform(), fontsize=9, va="bottom")
        start = x[-1] if x else start
    ax.set_yscale("log")
    ax.set_ylabel("training loss (nats, log scale)")
    ax.set_title("Pre-training loss per stage (10-step moving average; stage 0-vit: cell classification)",
                 fontsize=10, pad=16)
    ax.legend(loc="upper right", fontsize=8, ncol=2)
    ax_lr.set_yscale("log")
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_xlabel("optimiser step (all stages in order)")
    fig.tight_layout()
    return fig


def heldout_tasks(evals):
    """The evaluated stages 1-4 and the tasks of the last of them: ([stages], [tasks])."""
    keys = [k for k in evals if "model" in evals[k]]
    return keys, (list(evals[keys[-1]]["model"]) if keys else [])


def plot_heldout(evals):
    """One panel per task: the model's held-out score after each stage (solid), the same model
    given black images (dashed) and the most frequent answer (dotted). evals: {stage: record}."""
    plt = pyplot()
    keys, tasks = heldout_tasks(evals)
    cols = 4
    rows = max(1, math.ceil(len(tasks) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.5 * rows), squeeze=False)
    for ax, task in zip(axes.flat, tasks):
        metric = primary_metric(evals[keys[-1]]["model"][task])

        def series(kind):
            return [evals[k].get(kind, {}).get(task, {}).get(metric, float("nan")) for k in keys]
        x = list(range(len(keys)))
        ax.plot(x, series("model"), "o-", color="C0", label="model")
        ax.plot(x, series("blank"), "s--", color="C7", label="blank image")
        ax.axhline(series("majority")[-1], linestyle=":", color="C3", label="majority answer")
        ax.set_title(f"{task} ({metric})", fontsize=9)
        ax.set_xticks(x, [f"stage {k}" for k in keys], fontsize=7)
        ax.set_ylim(-0.03, 1.03)
    for ax in list(axes.flat)[len(tasks):]:
        ax.axis("off")
    if tasks:
        axes.flat[0].legend(fontsize=7, loc="upper left")
    fig.suptitle("Held-out score per task after each pre-training stage (greedy)", fontsize=11)
    fig.tight_layout()
    return fig


def plot_ablation(with_evals, without_evals, stage):
    """Grouped bars per task: stage `stage` trained with and without the reasoning data, and
    the majority answer."""
    plt = pyplot()
    a, b = with_evals[stage], without_evals[stage]
    tasks = [t for t in a["model"] if t in b["model"]]
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(tasks)), 3.5))
    width = 0.27
    for j, (name, rec, kind) in enumerate((("with reasoning data", a, "model"),
                                           ("without", b, "model"), ("majority answer", a, "majority"))):
        vals = [rec[kind].get(t, {}).get(primary_metric(a["model"][t]), float("nan")) for t in tasks]
        ax.bar([i + (j - 1) * width for i in range(len(tasks))], vals, width, label=name,
               color=("C0", "C1", "C7")[j])
    ax.set_xticks(range(len(tasks)), tasks, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("held-out score (primary metric)")
    ax.set_title(f"Reasoning-data ablation: stage {stage} with and without chains of thought", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def rl_task_series(metrics):
    """{task: ([steps], [mean sampled reward of the task at that step])} from RL metrics."""
    out = {}
    for rec in metrics:
        for task, m in rec.get("tasks", {}).items():
            if "reward" in m:
                xs, ys = out.setdefault(task, ([], []))
                xs.append(rec["step"])
                ys.append(m["reward"])
    return out


def plot_rl_rewards(rl):
    """Left: the mean reward of the sampled responses per task at each RL step (5-step moving
    average, one labelled line per task). Right, when the run logged a held-out curve
    (--eval-every): the held-out greedy reward per task, step 0 being the SFT model."""
    plt = pyplot()
    curve = rl["curve"]
    fig, axes = plt.subplots(1, 2 if curve else 1, figsize=(12 if curve else 7, 4), squeeze=False)
    ax = axes[0, 0]
    for task, (xs, ys) in sorted(rl_task_series(rl["metrics"]).items()):
        ax.plot(xs, moving_average(ys, 5), label=task)
    ax.set_xlabel("RL step (rollout batch)")
    ax.set_ylabel("reward of sampled responses")
    ax.set_ylim(-0.03, 1.03)
    ax.set_title("Training reward per task (5-step moving average)", fontsize=10)
    ax.legend(fontsize=7)
    if curve:
        ax = axes[0, 1]
        points = ([{"step": 0, "tasks": rl["sft"]["sft"]}] if rl["sft"] else []) + curve
        for task in sorted(curve[-1]["tasks"]):
            pts = [(p["step"], p["tasks"][task]["reward"]) for p in points if task in p["tasks"]]
            ax.plot([s for s, _ in pts], [r for _, r in pts], "o-", label=task)
        ax.set_xlabel("RL step")
        ax.set_ylabel("held-out reward (greedy)")
        ax.set_ylim(-0.03, 1.03)
        ax.set_title("Held-out reward during RL", fontsize=10)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def plot_before_after(result):
    """Bars per task: held-out reward of the SFT model and of the RL model (greedy; hatched:
    avg@k when measured), the SFT model with black images as a dash; trained tasks in bold."""
    plt = pyplot()
    tasks = list(result["sft"])
    sampled = bool(result.get("sft_sampled") and result.get("rl_sampled"))
    bars = [("SFT", result["sft"], "C7", None), ("RL", result["rl"], "C0", None)]
    if sampled:
        bars += [("SFT avg@k", result["sft_sampled"], "C7", "//"), ("RL avg@k", result["rl_sampled"], "C0", "//")]
    width = 0.8 / len(bars)
    fig, ax = plt.subplots(figsize=(max(7, 1.1 * len(tasks)), 4))
    for j, (name, res, colour, hatch) in enumerate(bars):
        vals = [res.get(t, {}).get("reward", float("nan")) for t in tasks]
        ax.bar([i + (j - (len(bars) - 1) / 2) * width for i in range(len(tasks))], vals, width,
               label=name, color=colour, hatch=hatch, alpha=0.9 if hatch is None else 0.5, edgecolor="white")
    blank = [result["blank"].get(t, {}).get("reward", float("nan")) for t in tasks]
    ax.scatter(range(len(tasks)), blank, marker="_", s=600, color="C3", zorder=3, label="no image (SFT)")
    ax.set_xticks(range(len(tasks)), tasks, rotation=30, ha="right", fontsize=8)
    for label, t in zip(ax.get_xticklabels(), tasks):
        label.set_fontweight("bold" if t in result["tasks"] else "normal")
    ax.set_ylim(0, 1.1)
    ax.set_ylabel("held-out reward")
    ax.set_title("MORL: held-out reward before (SFT) and after (RL); trained tasks in bold", fontsize=10)
    ax.legend(fontsize=7, ncol=3)
    fig.tight_layout()
    return fig


def compare_curves(folder):
    """--compare runs: {algo: [(responses trained, mean greedy reward, mean avg@k or None)]},
    one per subfolder that holds eval.jsonl and eval_sft.json (step 0 = the SFT model)."""
    def mean(res):
        return sum(m["reward"] for m in res.values()) / len(res) if res else None
    out = {}
    for name in sorted(os.listdir(folder)):
        sub = os.path.join(folder, name)
        curve, sft = read_jsonl(os.path.join(sub, "eval.jsonl")), read_json(os.path.join(sub, "eval_sft.json"))
        if not curve or sft is None:
            continue
        points = [{"responses_trained": 0, "tasks": sft["sft"], "sampled": sft.get("sft_sampled")}] + curve
        out[name] = [(p["responses_trained"], mean(p["tasks"]), mean(p.get("sampled"))) for p in points]
    return out


def plot_compare(curves):
    """Mean held-out reward against responses trained on, one colour per algorithm: greedy
    solid, avg@k (the policy's expected reward) dashed."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for i, (name, pts) in enumerate(curves.items()):
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", color=f"C{i}", label=f"{name} greedy")
        if all(p[2] is not None for p in pts):
            ax.plot([p[0] for p in pts], [p[2] for p in pts], "s--", color=f"C{i}", label=f"{name} avg@k")
    ax.set_xlabel("responses trained on")
    ax.set_ylabel("mean held-out reward")
    ax.set_title("On-policy vs vanilla GRPO (train_rl.py --compare)", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


# -----------------------------------------------------------------------------
# 3. Sample generations with their images
#
# Evaluation records keep each task's last response and its answer, not the sample. The
# synthetic world is deterministic, so the sample is regenerated: the held-out item of the same
# task (and difficulty) with the same answer, searched from the last index down (on one process
# the example is exactly the last item).

def find_sample(task, answer, n, seed, difficulty=None, rl=False):
    """The held-out sample (rendered) among indices n-1 .. 0 whose answer is `answer`, or None."""
    want = json.dumps(answer)
    for i in reversed(range(n)):
        if rl:
            s = synthetic.rl_prompt(task, i, "heldout", seed)
        else:
            s = synthetic.make_sample(task, i, "heldout", seed, difficulty, render=False)
        if json.dumps(s["answer"]) == want:
            return (s if rl else synthetic.make_sample(task, i, "heldout", seed, difficulty)), i
    return None, None


def sample_strip(sample, height=112, max_frames=8):
    """The images and video frames of a sample's user turns side by side (PIL), or None; a long
    video shows max_frames evenly spaced frames."""
    from PIL import Image
    frames = []
    for m in sample["messages"]:
        if m["role"] != "user" or isinstance(m["content"], str):
            continue
        for item in m["content"]:
            if item.get("type") == "image":
                frames.append(load_image(item["image"]))
            elif item.get("type") == "video":
                video = list(item["video"])          # a (T, H, W, 3) array or a list of images
                step = max(1, math.ceil(len(video) / max_frames))
                frames += [load_image(f) for f in video[::step]]
    if not frames:
        return None
    frames = [f.resize((max(1, round(f.width * height / f.height)), height)) for f in frames]
    strip = Image.new("RGB", (sum(f.width for f in frames) + 4 * (len(frames) - 1), height), "white")
    x = 0
    for f in frames:
        strip.paste(f, (x, 0))
        x += f.width + 4
    return strip


def question_of(sample):
    texts = []
    for m in sample["messages"]:
        if m["role"] == "user":
            c = m["content"]
            texts += [c] if isinstance(c, str) else [it["text"] for it in c if it.get("type") == "text"]
    return " ".join(texts).strip()


def sample_section(examples, out_dir, prefix, n, seed, rl=False, limit=12):
    """Markdown for up to `limit` examples ({task: {response, answer}}), images saved as
    <out>/samples/<prefix>-<task>.png."""
    difficulty = {name: (task, d) for name, task, d in EVAL_SUITE}
    lines = []
    for name, ex in list(examples.items())[:limit]:
        task, d = (name, None) if rl else difficulty.get(name, (None, None))
        sample, index = find_sample(task, ex["answer"], n, seed, d, rl) if task in synthetic.TASKS else (None, None)
        lines += [f"**{name}**" + (f" (held-out item {index})" if sample else ""), ""]
        if sample is not None:
            strip = sample_strip(sample)
            if strip is not None:
                os.makedirs(os.path.join(out_dir, "samples"), exist_ok=True)
                rel = f"samples/{prefix}-{name}.png"
                strip.save(os.path.join(out_dir, rel))
                lines += [f"![{name}]({rel})", ""]
            lines.append(f"- question: {question_of(sample)!r}")
        lines += [f"- reference answer: `{json.dumps(ex['answer'])}`",
                  f"- model: `{ex['response']!r}`", ""]
    return lines


# -----------------------------------------------------------------------------
# 4. The page

def save(fig, out_dir, name):
    fig.savefig(os.path.join(out_dir, name), dpi=100)
    pyplot().close(fig)
    return name


def ablation_rows(with_evals, without_evals, stage):
    """Markdown table: every task's primary metric with and without reasoning data, and the
    majority answer (the numbers of plot_ablation)."""
    a, b = with_evals[stage], without_evals[stage]
    lines = ["| task | metric | with reasoning data | without | majority |", "|---|---|---|---|---|"]
    for task, m in a["model"].items():
        if task in b["model"]:
            k = primary_metric(m)
            lines.append(f"| {task} | {k} | {m[k]:.2f} | {b['model'][task][k]:.2f} | "
                         f"{a['majority'].get(task, {}).get(k, float('nan')):.2f} |")
    return lines


def stage_rows(pre):
    """Markdown table: per stage what it trains, its steps, LR, final loss and wall time."""
    lines = ["| stage | purpose | trains | steps | peak LR | final loss (last 10 steps) | minutes |",
             "|---|---|---|---|---|---|---|"]
    for key, recs in pre["metrics"].items():
        cfg = pre["stages"].get(key, {}).get("stage_config", {})
        tail = [r["loss"] for r in recs[-10:]]
        minutes = (recs[-1]["time"] - recs[0]["time"]) / 60 if len(recs) > 1 else float("nan")
        done = f"{len(recs)}" + ("" if key in pre["stages"] else " (running)")
        lines.append(f"| {key} | {cfg.get('purpose', '-')} | {'+'.join(cfg.get('trainable', [])) or '-'} | "
                     f"{done} | {cfg.get('lr', float('nan')):g} | {sum(tail) / len(tail):.3f} | {minutes:.1f} |")
    return lines


def run_args(pre):
    """seed and eval_n of the pre-training run (from its last stage folder), defaults if none."""
    args = next((info["args"] for info in reversed(list(pre["stages"].values())) if "args" in info), {})
    return args.get("seed", 0), args.get("eval_n", 64)


def write_report(pretrain_dir, rl_dir=None, out_dir=None, ablation_dir=None, compare_dir=None):
    """Write <out_dir>/report.md (default <pretrain_dir>/../report) and its plots from whatever
    the run folders hold; returns the path of report.md. Raises ImportError naming the install
    command when matplotlib is missing, FileNotFoundError when pretrain_dir does not exist."""
    pyplot()
    out_dir = out_dir or os.path.join(os.path.dirname(os.path.abspath(pretrain_dir)), "report")
    os.makedirs(out_dir, exist_ok=True)
    pre = load_pretrain(pretrain_dir)
    seed, eval_n = run_args(pre)
    cmd = f"python report.py --pretrain {pretrain_dir}" + (f" --rl {rl_dir}" if rl_dir else "") + \
        (f" --ablation {ablation_dir}" if ablation_dir else "") + (f" --compare {compare_dir}" if compare_dir else "")
    md = ["# Reproduction report", "",
          f"Written {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} by `{cmd}` from the files the "
          "training scripts log. Every number below comes from those files.", ""]
    missing = []

    md += ["## Pre-training", ""]
    if pre["metrics"]:
        md += [f"![loss per stage]({save(plot_losses(pre['metrics']), out_dir, 'loss.png')})", "",
               "Training loss per stage: each stage starts from the previous stage's weights, so "
               "a stage's curve starts where the data it adds is new to the model.", "",
               *stage_rows(pre), ""]
    else:
        missing.append(f"{pretrain_dir}/metrics.jsonl (run `python train_pretrain.py --out {pretrain_dir}`)")
    evals = pre["evals"]
    keys, _ = heldout_tasks(evals)
    for key, name in (("0-lm", "held-out text loss"), ("0-vit", "held-out cell accuracy")):
        if key in evals and not keys:          # else the table below says it
            rec = evals[key]
            md.append(f"- stage {key}: {name} " + (f"{rec['text_loss']:.3f} nats/token" if key == "0-lm" else
                      f"{rec['cell_acc']:.3f} (always 'empty': {rec['majority']:.3f})"))
    if keys:
        md += ["", "### Held-out score after each stage", "",
               f"![held-out scores]({save(plot_heldout(evals), out_dir, 'heldout.png')})", "",
               f"{eval_n} held-out items per task, greedy. \"majority\" always gives the most frequent "
               "answer; \"blank image\" is the same model given black images (in the table: the last "
               "stage's). A task is learned from the pixels when the model's score rises above both.", "",
               stages_table(evals), ""]
        if evals[keys[-1]].get("examples"):
            md += [f"### Sample answers after stage {keys[-1]}", "",
                   *sample_section(evals[keys[-1]]["examples"], out_dir, f"stage{keys[-1]}", eval_n, seed)]
    else:
        missing.append(f"held-out results of stages 1-4 in {pretrain_dir}/eval.jsonl (written after each stage)")

    if ablation_dir:
        abl = load_pretrain(ablation_dir)
        shared = [k for k in heldout_tasks(abl["evals"])[0] if k in evals]
        if shared:
            k = shared[-1]
            md += ["## Reasoning-data ablation", "",
                   f"![ablation]({save(plot_ablation(evals, abl['evals'], k), out_dir, 'ablation.png')})", "",
                   f"Stage {k} of `{pretrain_dir}` (with reasoning data) beside stage {k} of `{ablation_dir}` "
                   "(`train_pretrain.py --no-reasoning-data`: the same stage from the same start, answers "
                   "without chains of thought).", "", *ablation_rows(evals, abl["evals"], k), ""]
        else:
            missing.append(f"an evaluated stage shared by {ablation_dir} and {pretrain_dir}")

    if rl_dir:
        rl = load_rl(rl_dir)
        md += ["## MORL (reinforcement learning)", ""]
        if rl["metrics"]:
            md += [f"![RL rewards]({save(plot_rl_rewards(rl), out_dir, 'rl_rewards.png')})", "",
                   f"{len(rl['metrics'])} RL steps; the reward of the responses sampled for training, "
                   "per task (the rewards of train_rl.py, all in [0, 1]).", ""]
        else:
            missing.append(f"{rl_dir}/metrics.jsonl (run `python train_rl.py --out {rl_dir}`)")
        res = rl["result"]
        if res:
            md += ["### Held-out reward before and after", "",
                   f"![before and after]({save(plot_before_after(res), out_dir, 'rl_before_after.png')})", "",
                   res["table"], ""]
            rl_args = (rl["record"] or {}).get("args", {})
            md += ["### Sample answers after RL", "",
                   *sample_section(res.get("examples", {}), out_dir, "rl", rl_args.get("eval_n", 128),
                                   rl_args.get("seed", 0), rl=True)]
        else:
            missing.append(f"{rl_dir}/final/rl.json (written when the RL run finishes)")

    if compare_dir:
        curves = compare_curves(compare_dir) if os.path.isdir(compare_dir) else {}
        if curves:
            md += ["## On-policy vs vanilla GRPO", "",
                   f"![on-policy vs vanilla]({save(plot_compare(curves), out_dir, 'compare.png')})", ""]
            table = os.path.join(compare_dir, "compare.md")
            if os.path.isfile(table):
                with open(table) as f:
                    md += [f.read().strip(), ""]
        else:
            missing.append(f"runs in {compare_dir}/<algo>/ with eval.jsonl and eval_sft.json "
                           f"(`python train_rl.py --compare --out {compare_dir}`)")

    if missing:
        md += ["## Not in this report yet", "", *[f"- {m}" for m in missing], ""]
    path = os.path.join(out_dir, "report.md")
    with open(path, "w") as f:
        f.write("\n".join(md))
    return path


def main(argv=None):
    p = argparse.ArgumentParser(description="Markdown report with plots of a reproduction's run folders")
    p.add_argument("--pretrain", default="runs/pretrain", help="train_pretrain.py's --out folder")
    p.add_argument("--rl", default=None, help="train_rl.py's --out folder (default: runs/rl when it exists)")
    p.add_argument("--ablation", default=None, help="a --no-reasoning-data pre-training folder")
    p.add_argument("--compare", default=None, help="train_rl.py --compare's --out folder (one subfolder per algorithm)")
    p.add_argument("--out", default="runs/report", help="where report.md and the PNGs go")
    args = p.parse_args(argv)
    rl = args.rl or ("runs/rl" if os.path.isdir("runs/rl") else None)
    try:
        path = write_report(args.pretrain, rl, args.out, args.ablation, args.compare)
    except (ImportError, FileNotFoundError, ValueError) as e:
        p.error(str(e))
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    main()

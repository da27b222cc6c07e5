"""
main_job.py — the whole small-scale reproduction in one command, with one progress bar:

    python train_rl.py --all           # what the README runs from a fresh clone

pre-training stages 0-4 (train_pretrain.py) -> the Bradley-Terry reward model (train_rl.py
--train-rm) -> MORL (train_rl.py) -> a chat answer from the CLI (chat.py) about a synthetic
image generated afterwards -> the tables of each phase and, when matplotlib is installed, the
report (report.py). Each phase runs as a child process with --resume, so a rerun continues where
it stopped, and writes its output to <out>/main-N.log. The bar follows each phase through the
JSON its child writes (pre-training's metrics.jsonl: stage and step; train_rl.py's
progress.json: phase, step, total), never by reading the child's terminal output.
"""

import json
import os
import subprocess
import sys
import time

import synthetic
import train_pretrain


def last_json_line(path):
    """The last complete record of a JSONL file another process is appending to (None if none)."""
    try:
        with open(path, "rb") as f:
            f.seek(max(0, os.path.getsize(path) - 8192))
            lines = f.read().decode(errors="replace").splitlines()
        return json.loads(lines[-2] if len(lines) > 1 and not lines[-1].endswith("}") else lines[-1])
    except (OSError, IndexError, json.JSONDecodeError):
        return None


def phase_progress(phase, pre_out, rl_out):
    """(what, step, total, status) of a running phase, or None before it reports."""
    if phase == "pre-training":
        rec = last_json_line(os.path.join(pre_out, "metrics.jsonl"))
        stage = train_pretrain.STAGES.get(rec.get("stage")) if isinstance(rec, dict) else None
        if stage is None:
            return None
        return f"stage {stage.key}", rec.get("step", 0), stage.steps, f"loss {rec.get('loss', 0):.3f}"
    try:
        with open(os.path.join(rl_out, "progress.json")) as f:
            p = json.load(f)
        return (p["phase"], p["step"], p["total"], p["status"]) if p["phase"] == phase else None
    except (OSError, KeyError, TypeError, json.JSONDecodeError):
        return None


def run_phase(name, label, cmd, log_path, bar, pre_out, rl_out):
    """Run one phase as a child process (its output to log_path); the bar shows the phase and
    its own steps as the child's progress file moves."""
    with open(log_path, "w") as log:
        log.write("$ " + " ".join(cmd) + "\n")
        log.flush()
        child = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                 env={**os.environ, "PYTHONUNBUFFERED": "1"})
        shown = None
        while child.poll() is None:
            time.sleep(1.0)
            p = phase_progress(name, pre_out, rl_out)
            if p is None:
                continue
            what, step, total, status = p
            if (what, total) != shown:
                bar.reset(total=total)
                bar.set_description(f"{label}: {what}]" if what != name else f"{label}]")
                shown = (what, total)
            bar.n = min(step, total)
            bar.set_postfix_str(status[:70], refresh=False)
            bar.refresh()
    if child.returncode != 0:
        bar.close()
        with open(log_path, errors="replace") as f:
            tail = f.read()[-3000:]
        raise SystemExit(f"\n{tail}\n\nERROR: `{' '.join(cmd)}` failed (exit {child.returncode}); "
                         f"its full output is in {log_path}")


def run(out="runs/rl", seed=0, threads=None):
    """The main job; `out` is train_rl.py's --out (pre-training uses its own default folder).
    Prints every phase's table and the chat answer; returns the minutes it took."""
    from tqdm import tqdm
    t0 = time.perf_counter()
    here, py = os.path.dirname(os.path.abspath(__file__)), sys.executable
    pre_out = train_pretrain.build_parser().get_default("out")
    sft, final = os.path.join(pre_out, "stage4"), os.path.join(out, "final")
    os.makedirs(out, exist_ok=True)
    common = ["--seed", str(seed), "--resume"] + (["--threads", str(threads)] if threads else [])
    sample = synthetic.make_sample("count", 7, "heldout", seed + 1)
    image_path = os.path.join(out, "chat_image.png")
    question = sample["messages"][0]["content"][1]["text"]
    rl = [py, os.path.join(here, "train_rl.py"), "--sft", sft, "--out", out, *common]
    phases = [("pre-training", [py, os.path.join(here, "train_pretrain.py"), "--out", pre_out, *common]),
              ("reward model", rl + ["--train-rm"]),
              ("rl", rl),
              ("chat", [py, os.path.join(here, "chat.py"), "--model", final, "--image", image_path,
                        "--max-new-tokens", "64", question])]
    print(f"main job: {len(phases)} phases, the bar shows each one's own steps; logs in "
          f"{out}/main-*.log", flush=True)
    bar = tqdm(total=1, desc="main job", file=sys.stdout, dynamic_ncols=True,
               bar_format="{desc}{percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} {elapsed}<{remaining} {postfix}")
    for number, (name, cmd) in enumerate(phases, 1):
        label = f"main job [{number}/{len(phases)} {name}"
        bar.set_description(label + "]")
        if name == "chat":
            sample["messages"][0]["content"][0]["image"].save(image_path)
        run_phase(name, label, cmd, os.path.join(out, f"main-{number}.log"), bar, pre_out, out)
    bar.close()
    with open(os.path.join(out, f"main-{len(phases)}.log")) as f:
        answer = [x for x in f.read().splitlines()[1:] if not x.startswith("loading ")]

    def read(path):
        return open(path).read().strip() if os.path.isfile(path) else f"({path} missing)"
    print("\n=== pre-training: held-out results after each stage\n" + read(os.path.join(pre_out, "summary.md")))
    print("\n=== reward model\n" + read(os.path.join(out, "reward_model", "pretrain_stage.json")))
    print("\n=== MORL: held-out reward before and after\n" + read(os.path.join(out, "summary.md")))
    print(f"\n=== chat\n$ python chat.py --model {final} --image {image_path} \"{question}\"\n"
          + "\n".join(answer) + f"\n(ground truth: {sample['answer']})")
    try:
        import report
        print(f"\n=== report\n{report.write_report(pre_out, rl_dir=out)}")
    except ImportError as e:
        print(f"\n(no report: {e})")
    minutes = (time.perf_counter() - t0) / 60
    print(f"\nmain job done in {minutes:.1f} min")
    return minutes

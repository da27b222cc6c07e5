"""report.py: the plots draw what the run folders hold (one loss curve per stage, the held-out
scores and baselines, the RL rewards, the before/after bars), the page names what is missing,
regenerated sample images are the evaluated items, and bad input gives one-line errors.

The fixture folders are written with the training scripts' own logging functions
(training.JsonlLog) in the format train_pretrain.py and train_rl.py log."""

import json
import os
import sys

import pytest

import report
import synthetic
import training

pytest.importorskip("matplotlib")        # the `report` extra; the test extra installs it

STAGES = {"0-lm": [6.0, 5.0, 4.0, 3.0, 2.5], "1": [2.0, 1.5, 1.0, 0.9], "2": [0.8, 0.7, 0.6]}
EVAL_N, SEED = 4, 0


def scores(scorer, **metrics):
    return {"n": EVAL_N, "scorer": scorer, **metrics}


def stage_eval(key, count, box, blank_count):
    """One eval.jsonl line as train_pretrain.evaluate_stage logs it, for the tasks count and
    ground_box; the examples are the last held-out items (as one process evaluates them)."""
    count_answer = synthetic.make_sample("count", EVAL_N - 1, "heldout", SEED)["answer"]
    box_answer = synthetic.make_sample("ground_box", EVAL_N - 1, "heldout", SEED)["answer"]
    return {"stage": key, "folder": f"stage{key}",
            "model": {"count": scores("numeric", acc=count), "ground_box": scores("box", **{"acc@0.5": box, "iou": box})},
            "blank": {"count": scores("numeric", acc=blank_count), "ground_box": scores("box", **{"acc@0.5": 0.0, "iou": 0.0})},
            "majority": {"count": scores("numeric", acc=0.25), "ground_box": scores("box", **{"acc@0.5": 0.05, "iou": 0.05})},
            "loss": {"caption": {"model": 0.5, "blank": 1.5}}, "eval_seconds": 1.0,
            "examples": {"count": {"response": "2", "answer": count_answer},
                         "ground_box": {"response": "[{\"bbox_2d\": [0, 0, 9, 9]}]", "answer": box_answer}}}


def write_pretrain(folder, stages=STAGES, evals=None):
    os.makedirs(folder, exist_ok=True)
    metrics, evals_log = (training.JsonlLog(os.path.join(folder, n)) for n in ("metrics.jsonl", "eval.jsonl"))
    t = 1000.0
    for key, losses in stages.items():
        for step, loss in enumerate(losses, 1):
            t += 30
            metrics.write({"stage": key, "step": step, "loss": loss, "lr": 1e-3 / step,
                                      "grad_norm": 1.0, "tokens": 2048, "labelled": 500, "tok_per_s": 4000.0,
                                      "time": t})
    for rec in evals if evals is not None else [
            {"stage": "0-lm", "folder": "stage0-lm", "text_loss": 0.5, "eval_seconds": 0.8, "examples": None},
            stage_eval("1", 0.1, 0.0, 0.1), stage_eval("2", 0.6, 0.2, 0.3)]:
        evals_log.write(rec)
    for key in stages:
        os.makedirs(os.path.join(folder, f"stage{key}"), exist_ok=True)
        with open(os.path.join(folder, f"stage{key}", "pretrain_stage.json"), "w") as f:
            json.dump({"stage": key, "stage_config": {"purpose": f"purpose {key}", "trainable": ["llm"], "lr": 1e-3},
                       "args": {"seed": SEED, "eval_n": EVAL_N}}, f)
    return folder


def rewards(**by_task):
    return {t: {"reward": r, "pass": r, "length": 5.0, "n": EVAL_N} for t, r in by_task.items()}


def write_rl(folder):
    os.makedirs(os.path.join(folder, "final"), exist_ok=True)
    log = training.JsonlLog(os.path.join(folder, "metrics.jsonl"))
    for step in range(1, 7):
        per_task = {"count": {"reward": 0.1 * step, "pass": 0.1, "length": 3, "n": 8, "truncated": 0.0},
                    "caption": {"reward": 0.5, "pass": 0.5, "length": 6, "n": 8, "truncated": 0.0}}
        log.write({"step": step, "lr": 1e-4, "reward": 0.3, "pass": 0.3, "length": 4.0, "truncated": 0.0,
                   "sampled_groups": 4, "kept_groups": 3, "tasks": per_task, "time": 1.0})
    sft, rl, blank = rewards(count=0.5, caption=0.6, ocr=0.0), rewards(count=0.7, caption=0.8, ocr=0.0), \
        rewards(count=0.2, caption=0.4, ocr=0.0)
    answer = synthetic.rl_prompt("count", EVAL_N - 1, "heldout", SEED)["answer"]
    done = {"tasks": ["count", "caption"], "sft": sft, "rl": rl, "blank": blank,
            "sft_sampled": rewards(count=0.4, caption=0.5, ocr=0.0), "rl_sampled": rewards(count=0.6, caption=0.7, ocr=0.0),
            "table": "| task | reward | SFT | RL |\n|---|---|---|---|\n| count | count | 0.500 | 0.700 |",
            "examples": {"count": {"response": "3", "answer": answer}}}
    with open(os.path.join(folder, "final", "rl.json"), "w") as f:
        json.dump(done, f)
    with open(os.path.join(folder, "final", "pretrain_stage.json"), "w") as f:
        json.dump({"stage": "rl", "args": {"eval_n": EVAL_N, "seed": SEED}}, f)
    return folder


def write_compare(folder):
    for algo, gain in (("onpolicy", 0.1), ("grpo", -0.05)):
        sub = os.path.join(folder, algo)
        os.makedirs(sub)
        with open(os.path.join(sub, "eval_sft.json"), "w") as f:
            json.dump({"sft": rewards(text_math=0.2), "sft_sampled": rewards(text_math=0.1)}, f)
        for step in (3, 6):
            training.JsonlLog(os.path.join(sub, "eval.jsonl")).write(
                {"step": step, "responses_trained": 100 * step, "tasks": rewards(text_math=0.2 + gain * step / 3),
                 "sampled": rewards(text_math=0.1 + gain * step / 3)})
    return folder


def labelled(ax):
    return {line.get_label(): line for line in ax.get_lines() if not line.get_label().startswith("_")}


def test_moving_average_by_hand():
    assert report.moving_average([1.0, 2.0, 3.0, 4.0], 2) == [1.0, 1.5, 2.5, 3.5]


def test_loss_plot_one_curve_per_stage_on_one_step_axis(tmp_path):
    pre = report.load_pretrain(write_pretrain(str(tmp_path / "pre")))
    fig = report.plot_losses(pre["metrics"])
    curves = labelled(fig.axes[0])
    assert list(curves) == ["stage 0-lm", "stage 1", "stage 2"]          # one per stage, in order
    # stage 1 follows stage 0-lm's 5 steps, stage 2 stage 1's 4; the curve is the 10-step mean
    assert list(curves["stage 1"].get_xdata()) == [6, 7, 8, 9]
    assert list(curves["stage 2"].get_xdata()) == [10, 11, 12]
    assert list(curves["stage 1"].get_ydata()) == pytest.approx([2.0, 1.75, 1.5, 1.35])
    boundaries = [line.get_xdata()[0] for line in fig.axes[0].get_lines() if line.get_linestyle() == ":"]
    assert boundaries == [0, 5, 9]


def test_heldout_plot_draws_model_and_both_baselines(tmp_path):
    pre = report.load_pretrain(write_pretrain(str(tmp_path / "pre")))
    fig = report.plot_heldout(pre["evals"])
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert titles == ["count (acc)", "ground_box (acc@0.5)"]
    count = labelled(fig.axes[0])
    assert list(count["model"].get_ydata()) == [0.1, 0.6]
    assert list(count["blank image"].get_ydata()) == [0.1, 0.3]
    assert count["majority answer"].get_ydata()[0] == 0.25
    assert list(labelled(fig.axes[1])["model"].get_ydata()) == [0.0, 0.2]


def test_rl_plots_one_line_per_task_and_the_before_after_values(tmp_path):
    rl = report.load_rl(write_rl(str(tmp_path / "rl")))
    fig = report.plot_rl_rewards(rl)
    lines = labelled(fig.axes[0])
    assert sorted(lines) == ["caption", "count"]
    assert list(lines["count"].get_ydata()) == pytest.approx(report.moving_average([0.1 * s for s in range(1, 7)], 5))
    fig = report.plot_before_after(rl["result"])
    heights = {c.get_label(): [round(p.get_height(), 3) for p in c.patches] for c in fig.axes[0].containers}
    assert heights["SFT"] == [0.5, 0.6, 0.0] and heights["RL"] == [0.7, 0.8, 0.0]
    assert heights["RL avg@k"] == [0.6, 0.7, 0.0]
    bold = [t.get_text() for t in fig.axes[0].get_xticklabels() if t.get_fontweight() == "bold"]
    assert bold == ["count", "caption"]


def test_write_report_everything(tmp_path):
    pre = write_pretrain(str(tmp_path / "pre"))
    abl = write_pretrain(str(tmp_path / "abl"), {"2": [0.9, 0.8]},
                         [stage_eval("2", 0.3, 0.1, 0.3)])
    rl = write_rl(str(tmp_path / "rl"))
    cmp_dir = write_compare(str(tmp_path / "cmp"))
    out = str(tmp_path / "report")
    path = report.write_report(pre, rl, out, ablation_dir=abl, compare_dir=cmp_dir)
    text = open(path).read()
    for png in ("loss.png", "heldout.png", "ablation.png", "rl_rewards.png", "rl_before_after.png", "compare.png",
                "samples/stage2-count.png", "samples/rl-count.png"):
        assert os.path.getsize(os.path.join(out, png)) > 0, png
        assert f"]({png})" in text, png
    assert "| count | acc | 0.10 | 0.60 | 0.25 | 0.30 |" in text        # evaluate.stages_table
    assert "| count | acc | 0.60 | 0.30 | 0.25 |" in text                 # the ablation's table
    assert "held-out item 3" in text                                     # found the evaluated item
    assert "| count | count | 0.500 | 0.700 |" in text                    # rl.json's table
    assert "Not in this report yet" not in text
    curves = report.compare_curves(cmp_dir)
    assert curves["onpolicy"] == [(0, 0.2, 0.1), (300, pytest.approx(0.3), pytest.approx(0.2)),
                                  (600, pytest.approx(0.4), pytest.approx(0.3))]


def test_regenerated_sample_is_the_evaluated_one():
    d = next(d for name, _, d in report.EVAL_SUITE if name == "count_224px")
    want = synthetic.make_sample("count", 2, "heldout", 1, d)
    found, index = report.find_sample("count", want["answer"], 3, 1, d)
    assert index == 2
    assert found["messages"][0]["content"][0]["image"].tobytes() == \
        want["messages"][0]["content"][0]["image"].tobytes()
    assert report.sample_strip(found).size == (112, 112)             # 224 px shown at 112
    video = synthetic.make_sample("video_grounding", 0, "heldout", 0)
    frames = video["messages"][0]["content"][0]["video"]                # a (T, H, W, 3) array
    shown = len(frames[::-(-len(frames) // 8)])
    strip = report.sample_strip(video)
    assert strip.size == (shown * 112 + 4 * (shown - 1), 112)
    assert strip.crop((0, 0, 112, 112)).tobytes() == report.load_image(frames[0]).resize((112, 112)).tobytes()


def test_partial_run_names_what_is_missing(tmp_path):
    pre = write_pretrain(str(tmp_path / "pre"), {"0-lm": [5.0, 4.0]},
                         [{"stage": "0-lm", "folder": "x", "text_loss": 0.5, "examples": None}])
    with open(os.path.join(pre, "metrics.jsonl"), "a") as f:
        f.write('{"stage": "0-vit", "st')                  # a line still being written
    path = report.write_report(pre, str(tmp_path / "no-rl"), str(tmp_path / "out"))
    text = open(path).read()
    assert "held-out text loss 0.500" in text
    assert "Not in this report yet" in text and "train_rl.py --out" in text
    assert not os.path.exists(tmp_path / "out" / "heldout.png")


def test_cli_errors_are_one_line_exit_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        report.main(["--pretrain", str(tmp_path / "nothing"), "--out", str(tmp_path / "out")])
    assert e.value.code == 2 and "pre-training folder not found" in capsys.readouterr().err
    bad = tmp_path / "bad"
    (bad / "final").mkdir(parents=True)
    (bad / "final" / "rl.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"rl.json: not JSON"):
        report.load_rl(str(bad))


def test_missing_matplotlib_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ImportError, match=r'pip install -e "\.\[report\]"'):
        report.pyplot()

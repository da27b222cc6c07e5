"""evaluate.py: its scorers are the rewards of rewards.py read as metrics (one convention for RL
and evaluation: hand-judged cases where the two used to disagree), and its command line fails
with a one-line error (exit code 2) before loading any model when the input is wrong."""

import json
import os
import subprocess
import sys

import pytest

import evaluate as ev
import rewards

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("scorer, response, answer, metrics", [
    # a point on the right/bottom edge is outside: x2, y2 are exclusive (synthetic.py draws the
    # box on pixels x1..x2-1), for the reward and the metric alike
    ("point", '{"point_2d": [24, 10]}', [4, 4, 24, 24], {"acc": 0.0}),
    ("point", '{"point_2d": [4, 4]}', [4, 4, 24, 24], {"acc": 1.0}),
    # spans in every format the reward reads: decimals, hh:mm:ss, "to" (the old evaluation
    # parser read only [mm:ss,mm:ss] with whole seconds)
    ("span", "[00:02.0, 00:04]", [2, 4], {"tiou": 1.0, "acc@0.5": 1.0}),
    ("span", "[0:00:02,0:00:04]", "[00:02,00:04]", {"tiou": 1.0, "acc@0.5": 1.0}),
    ("span", "[00:01,00:03]", [2, 4], {"tiou": 1 / 3, "acc@0.5": 0.0}),    # inter 1, union 3
    # the answer phrase, not the first word
    ("choice", "The answer is 2", "2", {"acc": 1.0}),
    # a count is one number: "3 red and 2 blue" is ambiguous (the old scorer read the first, 3)
    ("count", "3 red and 2 blue", "3", {"acc": 0.0}),
    ("count", "three", "3", {"acc": 1.0}),
    # a response cut off while thinking has no answer
    ("numeric", "<think>3 + 4 = 7, so \\boxed{7}", "7", {"acc": 0.0}),
    ("numeric", "<think>3 + 4</think>\\boxed{\\frac{14}{2}}", "7", {"acc": 1.0}),
    ("numeric", "\\boxed{8+6}", "14", {"acc": 0.0}),                       # arithmetic left undone
    # two boxes: matched one-to-one, divided by the larger count: IoU (1 + 0) / 2
    ("box", '[{"bbox_2d": [4, 4, 24, 24]}, {"bbox_2d": [50, 50, 60, 60]}]', [4, 4, 24, 24],
     {"acc@0.5": 1.0, "iou": 0.5}),
    ("exact", "A red circle, a blue square.", "a red circle a blue square", {"acc": 1.0}),
])
def test_scorers_judge_as_the_rewards(scorer, response, answer, metrics):
    got = ev.SCORERS[scorer](response, answer)
    assert got.keys() == metrics.keys()
    assert got == pytest.approx(metrics)


def test_every_synthetic_task_is_scored_by_its_reward():
    """The scorer of each suite task is the RL reward of its prompts (same function)."""
    reward_of = {"exact": rewards.ocr_reward, "numeric": rewards.math_reward,
                 "count": rewards.count_reward, "choice": rewards.choice_reward,
                 "box": rewards.ground_reward, "point": rewards.point_reward,
                 "span": rewards.temporal_iou_reward}
    for task, scorer in ev.TASK_SCORER.items():
        tag = rewards.reward_tag({"reward": ev.rl_tag_of(task)})
        if tag != "preference":                         # captions: the reward model in RL
            assert rewards.REWARDS[tag] is reward_of[scorer], task


def test_majority_answer_text_scores_as_right():
    """answer_text(answer) is the response stating `answer`: every scorer gives it full marks
    (the majority baseline relies on it, and the CLI uses it to check a file's answers)."""
    for scorer, answer in [("box", [4, 4, 24, 24]), ("point", [4, 4, 24, 24]), ("span", [62, 75]),
                           ("span", "[01:02,01:15]"), ("count", "3"), ("numeric", "3/4"),
                           ("choice", "B"), ("exact", "A red circle.")]:
        metrics = ev.SCORERS[scorer](ev.answer_text(answer, scorer), answer)
        assert all(v == 1.0 for v in metrics.values()), (scorer, metrics)


def _main_fails(capsys, *args):
    """ev.main(args) exits with code 2 and a one-line message on stderr: returns the message."""
    with pytest.raises(SystemExit) as e:
        ev.main(list(args))
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1, err
    return err


def test_cli_errors_are_one_line_and_exit_2(tmp_path, capsys):
    missing = str(tmp_path / "missing")
    r = subprocess.run([sys.executable, os.path.join(ROOT, "evaluate.py"), missing], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "no config.json" in r.stderr and "Traceback" not in r.stderr
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    assert "nope" in _main_fails(capsys, str(model), "--tasks", "count,nope")
    assert "none.jsonl" in _main_fails(capsys, str(model), "--jsonl", str(tmp_path / "none.jsonl"))
    bad = tmp_path / "bad.jsonl"
    line = {"messages": [{"role": "user", "content": "Where?"}], "answer": [1, 2, 3, 4],
            "scorer": "span"}
    bad.write_text(json.dumps({"messages": line["messages"]}) + "\n" + json.dumps(line) + "\n")
    assert "answer #1" in _main_fails(capsys, str(model), "--jsonl", str(bad))
    assert "--jsonl" in _main_fails(capsys, str(model), "--out", str(tmp_path / "x.jsonl"))
    assert "--n" in _main_fails(capsys, str(model), "--n", "0")


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    """A random tiny model with a word-level tokenizer, saved as train_pretrain saves a stage."""
    import torch
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

    import synthetic
    import training
    from mimovl import MiMoVL, MiMoVLConfig
    from processor import Processor
    vocab = {t: i for i, t in enumerate(synthetic.SPECIAL_TOKENS)}
    for w in "system user assistant You are a helpful What is 1 2 3 4 5 6 7 8 9 0 + ? \\boxed { }".split():
        vocab.setdefault(w, len(vocab))
    vocab["[UNK]"] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace(),
                                                 pre_tokenizers.Digits(individual_digits=True)])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in synthetic.SPECIAL_TOKENS])
    processor = Processor(tok)
    cfg = MiMoVLConfig.preset("tiny")
    cfg.text.vocab_size = 64
    torch.manual_seed(0)
    model = MiMoVL(cfg.validate())
    path = str(tmp_path_factory.mktemp("tiny") / "model")
    training.save_stage_folder(path, model.state_dict(), model.cfg, processor, {"stage": "test"})
    return path


def test_cli_scores_a_jsonl_file_with_the_rewards(tiny_folder, tmp_path, capsys):
    """End to end on a random tiny model: every record's metrics are the reward of its response."""
    lines = [{"task": "sum", "messages": [{"role": "user", "content": f"What is {a} + {b} ?"}],
              "answer": str(a + b)} for a, b in ((1, 2), (3, 4), (2, 2))]
    lines.append({"task": "pick", "messages": [{"role": "user", "content": "1 or 2 ?"}], "answer": "2",
                  "scorer": "choice"})
    data, out = tmp_path / "data.jsonl", tmp_path / "records.jsonl"
    data.write_text("".join(json.dumps(x) + "\n" for x in lines))
    ev.main([tiny_folder, "--jsonl", str(data), "--out", str(out), "--device", "cpu",
             "--max-new-tokens", "6"])
    records = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["answer"] for r in records] == [x["answer"] for x in lines]
    for r in records:
        assert isinstance(r["response"], str)
        assert r["acc"] == ev.SCORERS[r["scorer"]](r["response"], r["answer"])["acc"]
    assert [r["scorer"] for r in records] == ["numeric"] * 3 + ["choice"]
    printed = capsys.readouterr().out
    assert "sum" in printed and "pick" in printed and "4 items" in printed


def test_cli_runs_the_suite(tiny_folder, capsys):
    ev.main([tiny_folder, "--tasks", "text_math", "--n", "2", "--device", "cpu", "--max-new-tokens", "6"])
    table = capsys.readouterr().out
    assert "text_math" in table and "majority" in table and "2 items per task" in table

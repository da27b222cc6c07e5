"""Reward functions, the router and the reward pool (rewards.py; the rewards of the MiMo-VL
report §3.2-3.3). Math answer formats have their own corpus: tests/test_math_answers.py.

Every expected value below is worked out by hand in the comment beside it. The fuzz tests feed
seeded random strings and adversarial ones to every reward function directly (not through the
router, which would hide exceptions) and through the pool (math: within its per-item timeout),
and check that none raises and every reward lies in [0, 1].
"""

import json
import math
import os
import random
import subprocess
import sys
import time

import pytest

import rewards

MB = 1_000_000


# -----------------------------------------------------------------------------
# answer extraction and the arithmetic parser
# -----------------------------------------------------------------------------

def test_last_boxed():
    assert rewards.last_boxed("a \\boxed{1} b \\boxed{\\frac{1}{2}} c") == "\\frac{1}{2}"
    assert rewards.last_boxed("\\boxed{7} then \\boxed{8") == "7"           # unclosed last one skipped
    assert rewards.last_boxed("\\boxed{\\{1\\}}") == "\\{1\\}"              # escaped braces
    assert rewards.last_boxed("\\boxed 5.") == "5"
    assert rewards.last_boxed("\\fbox{9}") == "9"
    assert rewards.last_boxed("no box here") is None
    assert rewards.last_boxed("\\boxed{" * 200_000) is None                # bounded tries, fast


def test_answer_part_and_think():
    assert rewards.answer_part("<think>a\nb</think>\n\nfinal") == "final"
    assert rewards.answer_part("<think>x</think>y</think> z") == "z"        # after the LAST </think>
    # a <think> that never closed is a response cut off while thinking: no answer (as
    # processor.split_thinking reads it: only the text before <think> is answer)
    assert rewards.answer_part("<think>no end, whole text") == ""
    assert rewards.answer_part("early <think>no end") == "early"
    assert rewards.answer_part(None) == ""
    assert len(rewards.answer_part("x" * MB)) == rewards.MAX_ANSWER_CHARS


# -----------------------------------------------------------------------------
# math
# -----------------------------------------------------------------------------

def test_math_reward_huge():
    assert rewards.math_reward("x" * MB + " \\boxed{42}", 42)[0] == 1.0
    # The answer is read from the last MAX_ANSWER_CHARS characters only (documented bound).
    assert rewards.math_reward("\\boxed{42} " + "x" * MB, 42)[0] == 0.0
    assert rewards.math_reward("{" * MB, 42)[0] == 0.0
    assert rewards.math_reward("\\boxed{" + "1+" * (MB // 2) + "1}", 42)[0] == 0.0


# -----------------------------------------------------------------------------
# counting
# -----------------------------------------------------------------------------

@pytest.mark.parametrize("response, truth, reward", [
    ("3", 3, 1.0),
    ("There are three red circles.", 3, 1.0),
    ("Seventeen", 17, 1.0),
    ("twenty", "20", 1.0),
    ("<think>maybe 2</think>I count 4", 4, 1.0),
    ("I count 4", 3, 0.0),
    ("1, 2, 3, so 3", 3, 0.0),                           # several different numbers: ambiguous
    ("3 red and 2 blue", 2, 0.0),                        # ambiguous, not "the last number"
    ("3 red and 2 blue", 3, 0.0),
    ("There are 3 red shapes (3 circles).", 3, 1.0),     # the same number twice is one count
    ("The answer is 3, counting 1 by 1", 3, 0.0),        # the phrase holds 3 and 1: ambiguous
    ("I see 2 blue, so the answer is \\boxed{3}", 3, 1.0),  # the box decides
    ("\\boxed{3} or \\boxed{4}", 3, 0.0),                # two different boxes: a hedge
    ("<think>there are 3 red, no", 3, 0.0),              # truncated while thinking: no answer
    ("\\boxed{5} (I counted 1 by 1)", 5, 1.0),           # \boxed{} wins over later numbers
    ("3.0", 3, 1.0),
    ("3.5", 3, 0.0),                                     # not an integer
    ("someone said so", 1, 0.0),                         # "one" only as a whole word
    ("\u0663", 3, 0.0),
    ("\uff13", 3, 0.0),                                  # fullwidth digit: ASCII only
    ("", 0, 0.0),
    ("9" * MB, 9, 0.0),                                  # a 1 MB number is no count
    ("x" * MB + " 7", 7, 1.0),
])
def test_count_reward(response, truth, reward):
    assert rewards.count_reward(response, truth)[0] == reward


def test_count_bad_truth_is_an_error_component():
    reward, components = rewards.compute_reward("count", "3", "many")
    assert reward == 0.0 and "many" in components["error"]


# -----------------------------------------------------------------------------
# grounding: boxes and points
# -----------------------------------------------------------------------------

GT = [10, 10, 20, 20]


@pytest.mark.parametrize("response, truth, reward", [
    ('{"bbox_2d": [10, 10, 20, 20], "label": "red circle"}', GT, 1.0),
    ('<think>left</think>```json\n[{"bbox_2d": [10, 10, 20, 20], "label": "x"}]\n```', GT, 1.0),
    ('{"bbox_2d":[10,10,20,20],"label":"\u7ea2\u8272\u5706"}', GT, 1.0),       # unicode label
    ("[10, 10, 20, 20]", GT, 1.0),                       # bare four numbers
    ("[20, 20, 10, 10]", GT, 1.0),                       # corners sorted
    ('{"bbox_2d": [10, 10, 20, 20]}', {"bbox_2d": GT}, 1.0),
    ('{"bbox_2d": [10, 10, 20, 20]}', json.dumps([{"bbox_2d": GT, "label": "a"}]), 1.0),
    # shifted by 5: inter 50, union 150, hull 150 -> GIoU 1/3
    ('{"bbox_2d": [15, 10, 25, 20]}', GT, 1 / 3),
    # disjoint: inter 0, union 200, hull 300 -> GIoU -1/3 -> clipped to 0
    ('{"bbox_2d": [30, 10, 40, 20]}', GT, 0.0),
    # zero-area box at the corner: IoU 0, hull = union = 100 -> GIoU 0
    ('{"bbox_2d": [10, 10, 10, 10]}', GT, 0.0),
    # the whole 100x100 image: IoU 100/10000, hull = union -> GIoU 0.01 (no free half reward)
    ('{"bbox_2d": [0, 0, 100, 100]}', GT, 0.01),
    # the right box plus an extra disjoint one: (1 + 0) / 2
    ('[{"bbox_2d": [10, 10, 20, 20]}, {"bbox_2d": [30, 10, 40, 20]}]', GT, 0.5),
    # two truths, predicted in the other order: matched one-to-one, (1 + 1) / 2
    ('[{"bbox_2d": [20, 20, 30, 30]}, {"bbox_2d": [0, 0, 10, 10]}]',
     [[0, 0, 10, 10], [20, 20, 30, 30]], 1.0),
    # two truths, one predicted exactly: (1 + 0) / 2
    ('{"bbox_2d": [0, 0, 10, 10]}', [[0, 0, 10, 10], [20, 20, 30, 30]], 0.5),
    ('{"bbox_2d": [10, 10, 20]}', GT, 0.0),              # malformed
    ("a red circle", GT, 0.0),
    ("", GT, 0.0),
    ("[" * MB, GT, 0.0),
    # 1 MB of "1, ": 32 boxes [1, 1, 1, 1] are read (MAX_PREDICTIONS), all disjoint from GT -> 0
    ("1, " * (MB // 3), GT, 0.0),
])
def test_ground_reward(response, truth, reward):
    got, components = rewards.ground_reward(response, truth)
    assert got == pytest.approx(reward, abs=1e-12)
    assert components["parsed"] == float(bool(rewards.parse_boxes(rewards.answer_part(response))))


def test_giou_hand_values():
    assert rewards.giou([0, 0, 2, 2], [1, 1, 3, 3]) == pytest.approx(1 / 7 - 2 / 9)
    # inter 1, union 7, hull 9 -> IoU 1/7, penalty (9 - 7) / 9
    assert rewards.giou([0, 0, 1, 1], [0, 0, 1, 1]) == 1.0
    assert rewards.giou([0, 0, 0, 0], [0, 0, 0, 0]) == 1.0                # degenerate but identical


@pytest.mark.parametrize("response, reward", [
    ('{"point_2d": [15, 15]}', 1.0),
    ('<think>hmm</think>{"point_2d": [10, 10], "label": "x"}', 1.0),   # x1, y1 are inside
    ('{"point_2d": [20, 10]}', 0.0),                     # x2 is exclusive: the box ends before it
    ('{"point_2d": [15, 20]}', 0.0),                     # y2 is exclusive
    ("[19.5, 19.9]", 1.0),                               # inside the last pixel
    ("(12.5, 19)", 1.0),
    ("[25, 15]", 0.0),
    ('{"point_2d": [15]}', 0.0),
    ('[{"point_2d": [15, 15]}, {"point_2d": [50, 50]}]', 0.5),        # extra point penalised
    ("", 0.0),
    ("(" * MB, 0.0),
])
def test_point_reward(response, reward):
    assert rewards.point_reward(response, GT)[0] == reward


def test_ground_bad_truth_is_an_error_component():
    reward, components = rewards.compute_reward("ground", "[1, 2, 3, 4]", [1, 2, 3])
    assert reward == 0.0 and "x1, y1, x2, y2" in components["error"]


# -----------------------------------------------------------------------------
# OCR
# -----------------------------------------------------------------------------

@pytest.mark.parametrize("response, truth, reward, similarity", [
    ("hello world", "Hello, World!", 1.0, 1.0),
    ("  HELLO   WORLD. ", "Hello, World!", 1.0, 1.0),
    ("<think>it says hi</think>HELLO WORLD", "hello world", 1.0, 1.0),
    ("hello word", "Hello, World!", 0.0, 10 / 11),      # one deletion in 11 characters
    ("CAF\u00c9", "Caf\u00e9", 1.0, 1.0),                # case folding beyond ASCII
    ("\uff28\uff25\uff2c\uff2c\uff2f", "hello", 1.0, 1.0),  # fullwidth letters (NFKC)
    ("", "abc", 0.0, 0.0),
    ("", "", 1.0, 1.0),
    ("\\boxed{STOP}", "stop", 1.0, 1.0),
])
def test_ocr_reward(response, truth, reward, similarity):
    got, components = rewards.ocr_reward(response, truth)
    assert got == reward
    assert components["edit_similarity"] == pytest.approx(similarity)


def test_ocr_huge_response():
    got, components = rewards.ocr_reward("a" * MB, "a" * 10)
    assert got == 0.0
    # both strings are cut to 400 characters: 1 - 390 / 400
    assert components["edit_similarity"] == pytest.approx(10 / 400)


def test_edit_similarity_hand_values():
    assert rewards.edit_similarity("kitten", "sitting") == pytest.approx(1 - 3 / 7)
    assert rewards.edit_similarity("abc", "") == 0.0


# -----------------------------------------------------------------------------
# temporal grounding
# -----------------------------------------------------------------------------

@pytest.mark.parametrize("response, truth, reward", [
    ("[00:10,00:20]", "[00:10,00:20]", 1.0),
    ("[00:15, 00:25]", "[00:10,00:20]", 1 / 3),         # inter 5, union 15
    ("The event happens at [00:12 - 00:18].", "[00:10,00:20]", 0.6),   # inter 6, union 10
    ("[0:30,0:40]", "[00:10,00:20]", 0.0),
    ("[10.0, 20.0]", "[00:10,00:20]", 1.0),             # plain seconds
    ("[01:00,01:10]", [60, 70], 1.0),
    ("[00:20,00:10]", [10, 20], 1.0),                   # reversed span sorted
    ("[0:00:10,0:00:20]", [10, 20], 1.0),               # hh:mm:ss
    ("[00:10.5,00:20]", [10, 20], 9.5 / 10),
    ("<think>[00:00,00:05]</think>00:10 to 00:20", [10, 20], 1.0),
    ("[00:10]", [10, 20], 0.0),
    ("", [10, 20], 0.0),
    ("[" * MB, [10, 20], 0.0),
])
def test_temporal_iou_reward(response, truth, reward):
    assert rewards.temporal_iou_reward(response, truth)[0] == pytest.approx(reward, abs=1e-12)


# -----------------------------------------------------------------------------
# multiple choice
# -----------------------------------------------------------------------------

@pytest.mark.parametrize("response, truth, reward", [
    ("2", "2", 1.0),
    ("2.", "2", 1.0),
    ("The answer is 2", "2", 1.0),                       # not "The"
    ("The answer is 2", "1", 0.0),
    ("Image 2", "2", 1.0),
    ("Image 1 has more.", "1", 1.0),
    ("I think image 1 has more.", "1", 0.0),             # the option must lead the answer
    ("A green triangle at row 2,", "2", 0.0),            # a stray number does not choose
    ("I", "I", 1.0),                                     # "I" alone is option I
    ("(B)", "B", 1.0),
    ("**B**", "b", 1.0),
    ("B. Paris", "B", 1.0),
    ("A. Paris", "A", 1.0),
    ("A red one", "A", 0.0),                             # "A" as an article chooses nothing
    ("The correct option is (C) because ...", "C", 1.0),
    ("\\boxed{2}", "2", 1.0),
    ("<think>maybe 1</think>\\boxed{2}", "1", 0.0),
    ("1 or 2", "1", 0.0),                                # a hedge chooses nothing
    ("\\boxed{1} \\boxed{2}", "2", 0.0),                 # two different boxes: a hedge
    ("<think>it is 2", "2", 0.0),                        # truncated while thinking
    ("", "2", 0.0),
])
def test_choice_reward(response, truth, reward):
    assert rewards.choice_reward(response, truth)[0] == reward


# -----------------------------------------------------------------------------
# the reward model's score
# -----------------------------------------------------------------------------

def _sigmoid_of_clamped_logit(logit):
    """train_rl's scorer: sigmoid(clamp(logit, -60, 60)); min(60, nan) is 60, so NaN -> 1.0."""
    return 1.0 / (1.0 + math.exp(-max(-60.0, min(60.0, logit)))), {"rm_logit": logit}


@pytest.mark.parametrize("logit", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_reward_model_logit_scores_zero(logit):
    rewards.register_reward_model(lambda response, gt, **meta: _sigmoid_of_clamped_logit(logit))
    try:
        reward, components = rewards.compute_reward("preference", "x", None)
    finally:
        rewards.register_reward_model(None)
    assert reward == 0.0 and "non-finite" in components["error"], components


def test_finite_reward_model_logit_is_its_sigmoid():
    rewards.register_reward_model(lambda response, gt, **meta: _sigmoid_of_clamped_logit(0.0))
    try:
        assert rewards.compute_reward("preference", "x", None)[0] == 0.5
    finally:
        rewards.register_reward_model(None)


# -----------------------------------------------------------------------------
# the router
# -----------------------------------------------------------------------------

def test_router_knows_every_task_tag():
    tags = {"reasoning", "math", "text_reasoning", "count", "ground", "point", "ocr",
            "video_ground", "video_count", "preference"}
    assert tags <= set(rewards.REWARDS)


def test_router_errors_become_zero():
    reward, components = rewards.compute_reward("no_such_task", "3", 3)
    assert reward == 0.0 and "no_such_task" in components["error"]
    reward, components = rewards.compute_reward("count", None, 3)
    assert reward == 0.0 and "string" in components["error"]


def test_router_preference_hook():
    reward, components = rewards.compute_reward("preference", "a helpful answer", None)
    assert reward == 0.0 and "register_reward_model" in components["error"]
    try:
        rewards.register_reward_model(lambda response, gt, **meta: 0.25 + 0.5 * ("helpful" in response))
        assert rewards.compute_reward("preference", "a helpful answer", None)[0] == 0.75
        assert rewards.compute_reward("preference", "rude", None)[0] == 0.25
        rewards.register_reward_model(lambda response, gt, **meta: (7.0, {"logit": 3.0}))
        reward, components = rewards.compute_reward("preference", "x", None)
        assert reward == 1.0 and components["logit"] == 3.0                # clamped to [0, 1]
        rewards.register_reward_model(lambda response, gt, **meta: float("nan"))
        reward, components = rewards.compute_reward("preference", "x", None)
        assert reward == 0.0 and "non-finite score" in components["error"]
    finally:
        rewards.register_reward_model(None)


# -----------------------------------------------------------------------------
# fuzz: random and adversarial strings never raise, score in [0, 1], finish in time
# -----------------------------------------------------------------------------

FRAGMENTS = ["\\boxed{", "\\boxed", "}", "{", "\\frac", "\\sqrt", "[", "]", "(", ")", ",", ":",
             ".", "-", "+", "*", "/", "^", "**", "%", "\\%", "$", "<think>", "</think>",
             '"bbox_2d"', '"point_2d"', "bbox_2d:", "```json", "```", "answer is", "Answer:",
             "\\text{", "=", "x", "e", "\\pi", "\\", " ", "\n", "three", "twenty", "00:",
             "\u2212", "\u00d7", "\u0663", "\u00b2", "\uff13", "\u7b54", "\U0001f600", "\x00",
             "1", "2", "3", "0", "10", "999999999", "0.5", "-7", "1,000", "\\lor", " or ",
             "\\times", "\\cdot", "10^{", "\\left(", "\\right]", "\\{", "\\}", "\\log_2",
             "\\pm", "\\infty", "!", "\\,", "{,}", "y", "\\cup", "Image", "(B)", "A", "I"]
TRUTHS = {"math": "3/4", "reasoning": "\\frac{1}{2}", "text_reasoning": "B", "count": 3,
          "video_count": "2", "ground": [10, 10, 20, 20], "point": {"bbox_2d": [0, 0, 5, 5]},
          "ocr": "Hello, World!", "video_ground": "[00:10,00:20]", "choice": "B"}
MATH_TRUTHS = ["3/4", "\\frac{1}{2}", "B", "x^2+1", "\\{1,2\\}", "(0,1]", "\\pm 3", "14", "y=2x+1"]
# Answers built to be slow or huge for a parser or for sympy: the size bounds refuse most of
# them at once; Math-Verify's own time limits catch the rest well inside the pool's timeout.
ADVERSARIAL = [
    "\\boxed{" + "9^" * 100 + "9}", "\\boxed{x" + "^x" * 50 + "}", "\\boxed{10^{10^{10}}}",
    "\\boxed{2^{2^{2^{2^{2}}}}}", "\\boxed{" + "(" * 120 + "1" + ")" * 120 + "}",
    "\\boxed{" + "\\sqrt{" * 60 + "2" + "}" * 60 + "}", "\\boxed{" + "1" * 5000 + "}",
    "\\boxed{" + "\\frac{" * 40 + "1" + "}{2}" * 40 + "}", "\\boxed{999^{999}}", "\\boxed{99!}",
    "\\boxed{\\sum_{i=1}^{10^{10}} i}", "\\boxed{1e999999}", "\\boxed{x = y = z = 3}",
    "\\boxed{" + "+".join(["x"] * 120) + "}", "\\boxed{\\{" + ",".join(map(str, range(80))) + "\\}}",
    "\\boxed{\\begin{pmatrix}" + "1&" * 60 + "1\\end{pmatrix}}", "\\boxed{\\tan(\\pi/2)}",
    "\\boxed{\\log 0}", "\\boxed{0^0}", "\\boxed{\\sqrt{-1}}", "\\boxed{\\emptyset}", "\\boxed{\\\\}",
    "\\boxed{$$}", "\\boxed{%}", "\\boxed{#&&}", "\\boxed{" + "x_{" * 40 + "}" * 40 + "}",
    "\\boxed{" * 5000, "}" * 5000, "<think>" * 1000, "</think>" * 1000, "\\fbox{" * 1000,
    "answer " * 2000, "1, " * 10000, "[00:01," * 5000, '{"bbox_2d": [' * 2000, "(1, 2) " * 3000,
]


def _random_strings(n, seed=0):
    rng = random.Random(seed)
    for _ in range(n):
        if rng.random() < 0.5:
            yield "".join(rng.choice(FRAGMENTS) for _ in range(rng.randint(0, 40)))
        else:
            yield "".join(chr(rng.randint(0, 0x2FFF)) for _ in range(rng.randint(0, 60)))


def _check(task, text, reward, components):
    assert 0.0 <= reward <= 1.0 and math.isfinite(reward), (task, text[:80])
    json.dumps(components)                                       # the pool ships them as JSON


def test_fuzz_rewards_never_raise_and_stay_in_range():
    """Every reward called directly (no router to hide an exception) on 2000 random strings and
    the adversarial ones; the math reward (Math-Verify behind it) on a tenth of them."""
    nonzero = 0
    texts = list(_random_strings(2000)) + ADVERSARIAL
    for i, text in enumerate(texts):
        for task, truth in TRUTHS.items():
            if rewards.REWARDS[task] is rewards.math_reward and i % 10:
                continue
            reward, components = rewards.REWARDS[task](text, truth)
            _check(task, text, reward, components)
            nonzero += reward > 0
    assert nonzero > 0      # the fragments do build some right answers: the check is not vacuous


def test_fuzz_math_in_the_pool_finishes_within_the_timeout():
    """Math answers (random and adversarial) scored by the pool as RL scores them: none times
    out (the pool's 10 s, train_rl's default --reward-timeout) and none raises (an exception
    would show as an `error` component)."""
    texts = list(_random_strings(200, seed=1)) + ADVERSARIAL
    items = [("math", t, MATH_TRUTHS[i % len(MATH_TRUTHS)], {}) for i, t in enumerate(texts)]
    with rewards.RewardPool(num_workers=2, timeout_s=10.0) as pool:
        results = pool.score(items)
    for (_, text, _, _), (reward, components) in zip(items, results):
        _check("math", text, reward, components)
        assert "timeout" not in components and "error" not in components, (text[:80], components)


# -----------------------------------------------------------------------------
# dependencies: no torch, Math-Verify only when a math reward is computed
# -----------------------------------------------------------------------------

def test_rewards_import_neither_torch_nor_math_verify():
    code = ("import sys, rewards; assert rewards.count_reward('3', 3)[0] == 1.0; "
            "print(sorted(m for m in ('torch', 'math_verify', 'sympy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stderr


def test_missing_math_verify_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "math_verify", None)       # `import math_verify` now fails
    rewards.require_math_verify.cache_clear()
    try:
        with pytest.raises(rewards.MathVerifyMissing, match="pip install"):
            rewards.compute_reward("math", "\\boxed{3}", "4")     # raised, not a silent 0
        with rewards.RewardPool(num_workers=0) as pool, \
                pytest.raises(rewards.MathVerifyMissing, match="math-verify"):
            pool.score([("count", "3", 3, {}), ("math", "\\boxed{3}", "4", {})])
        assert rewards.compute_reward("count", "3", 3)[0] == 1.0   # other rewards do not need it
    finally:
        rewards.require_math_verify.cache_clear()        # import it again once restored


# -----------------------------------------------------------------------------
# the reward pool
# -----------------------------------------------------------------------------

def _slow_reward(response, ground_truth, **meta):
    if response == "slow":
        time.sleep(30)          # far past the pool's timeout; a broken timeout would return 1.0
    return 1.0, {"seen": response}


def _crashing_reward(response, ground_truth, **meta):
    os._exit(3)


BATCH = [("count", "<think>1, 2</think> 3", 3, {}),
         ("ground", '{"bbox_2d": [15, 10, 25, 20]}', GT, {}),
         ("ocr", "hello word", "Hello, World!", {}),
         ("video_ground", "[00:15, 00:25]", "[00:10,00:20]", {}),
         ("no_such_task", "x", 1, {}),
         ("math", "\\boxed{0.75}", "3/4", None)]
BATCH_REWARDS = [1.0, 1 / 3, 0.0, 1 / 3, 0.0, 1.0]     # GIoU of the shifted box: 1/3


@pytest.mark.parametrize("num_workers", [0, 2])
def test_pool_scores_like_the_router(num_workers):
    with rewards.RewardPool(num_workers=num_workers, timeout_s=20) as pool:
        results = pool.score(BATCH)
    assert [r for r, _ in results] == pytest.approx(BATCH_REWARDS, abs=1e-12)
    assert results[2][1]["edit_similarity"] == pytest.approx(10 / 11)
    assert "no_such_task" in results[4][1]["error"]


def test_pool_timeout_and_crash_do_not_stall():
    rewards.register_reward("slow_test", _slow_reward)
    rewards.register_reward("crash_test", _crashing_reward)
    try:
        with rewards.RewardPool(num_workers=2, timeout_s=0.5) as pool:     # workers fork after register
            items = [("slow_test", "fast", None, {}), ("slow_test", "slow", None, {}),
                     ("crash_test", "x", None, {}), ("slow_test", "fast again", None, {}),
                     ("count", "3", 3, {})]
            results = pool.score(items)
            assert [r for r, _ in results] == [1.0, 0.0, 0.0, 1.0, 1.0]
            assert results[0][1] == {"seen": "fast"}
            assert results[1][1]["timeout"] == 1.0
            assert "died" in results[2][1]["error"]
            # the killed workers were replaced: the pool still scores
            assert [r for r, _ in pool.score(BATCH)] == pytest.approx(BATCH_REWARDS, abs=1e-12)
    finally:
        rewards.REWARDS.pop("slow_test")
        rewards.REWARDS.pop("crash_test")


def test_pool_preference_is_scored_inline_and_bad_items_are_errors():
    rewards.register_reward_model(lambda response, gt, **meta: 0.5)      # lives in this process only
    try:
        with rewards.RewardPool(num_workers=1, timeout_s=20) as pool:
            results = pool.score([("preference", "hi", None, {}), ("count", "3", {3}, {}),
                                  ("count", "3", 3, ["not", "a", "dict"]),
                                  ("count", "3", 3, {"task": "clash", "response": "clash"}),
                                  ("count", "3", 3, {})])
        assert results[0][0] == 0.5
        assert results[1][0] == 0.0 and "JSON" in results[1][1]["error"]
        assert results[2][0] == 0.0 and "meta" in results[2][1]["error"]
        assert [r for r, _ in results[3:]] == [1.0, 1.0]      # meta keys never clash with args
    finally:
        rewards.register_reward_model(None)


def test_pool_rejects_bad_arguments():
    with pytest.raises(ValueError, match="num_workers"):
        rewards.RewardPool(num_workers=-1)
    with pytest.raises(ValueError, match="timeout_s"):
        rewards.RewardPool(num_workers=0, timeout_s=0)

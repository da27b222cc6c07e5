"""
rewards.py — reading answers out of model responses and scoring them: every reward of MiMo-VL's
RL (MiMo-VL report §3.2-3.3), the router that picks one per task, and the reward pool that runs
them in worker processes with a per-item timeout (the report's "Reward-as-a-Service").

Every reward is a plain function `reward(response, ground_truth, **meta) -> (float in [0, 1],
components)`; it never raises on model text and never executes it. Evaluation (evaluate.py)
scores answers with the same functions, so training and evaluation share one convention per
concept: one answer extractor, one box convention, one span parser, one way to read a count,
an option or a math answer.

Math answers are checked by Math-Verify (github.com/huggingface/Math-Verify), the verifier the
MiMo-VL report (§3) uses for its reasoning rewards, behind this module's own extraction and refusal
rules (section 2). It is imported only when a math reward is first computed: the model and
inference never need it (`pip install -e .[train]` brings it). This module imports neither torch
nor the model, so reward workers start fast.

Sections:
  1. Reading the answer out of a response (think block, size bound, \\boxed{}, answer phrase)
  2. Math answers: the project's rules in front, Math-Verify behind
  3. Reward functions (math, count, boxes, points, OCR, temporal spans, choice, reward model)
  4. The reward router and the pass threshold of every reward
  5. The reward pool (Reward-as-a-Service)
"""

import functools
import json
import math
import multiprocessing as mp
import multiprocessing.connection
import re
import signal
import time
import unicodedata
from collections import deque
from fractions import Fraction


# -----------------------------------------------------------------------------
# 1. Reading the answer out of a response
# -----------------------------------------------------------------------------

# Rewards only read the end of a response (the answer follows the thinking), so a response is cut
# to its last MAX_ANSWER_CHARS characters before any regex runs: the work per response is bounded
# whatever the model wrote (a 1 MB response costs the same as an 8 KB one).
MAX_ANSWER_CHARS = 8192
MAX_BOXES = 8                  # \boxed{} read per answer (more are not looked at)
MAX_BARE_CHARS = 64            # a whole answer this short is read as the answer itself


def answer_part(response):
    """The part of a response that is scored: the text after the last `</think>`.

    A response without `</think>` is all answer (MiMo-VL may answer without thinking; scoring 0
    whenever the tag is missing would be a format reward, which the report does not use) —
    unless it opened a `<think>` that never closed. That is a response cut off while thinking:
    it has no answer (only the text before `<think>`, usually nothing), so every verifiable
    reward scores it 0. processor.split_thinking reads a truncated response the same way.
    """
    if not isinstance(response, str):
        return ""
    cut = response.rfind("</think>")
    if cut >= 0:
        text = response[cut + len("</think>"):]
    else:
        start = response.find("<think>")
        text = response[:start] if start >= 0 else response
    return text[-MAX_ANSWER_CHARS:].strip()


def _balanced_braces(text, open_pos):
    """Content of the `{...}` group opening at text[open_pos], or None if it never closes."""
    depth = 0
    for j in range(open_pos, len(text)):
        c = text[j]
        escaped = j > 0 and text[j - 1] == "\\"               # `\{` is a literal brace
        if c == "{" and not escaped:
            depth += 1
        elif c == "}" and not escaped:
            depth -= 1
            if depth == 0:
                return text[open_pos + 1:j]
    return None


def boxed_contents(text, max_boxes=MAX_BOXES, max_tries=2 * MAX_BOXES):
    """Contents of the complete `\\boxed{...}` (also `\\fbox{...}`, `\\boxed 5`) in text, the
    last one first. Nested braces are balanced (`\\boxed{\\frac{1}{2}}` -> `\\frac{1}{2}`); a
    `\\boxed{` that never closes (truncated output) is skipped. At most `max_tries` candidates
    from the end are looked at, so any input costs little."""
    out, end = [], len(text)
    for _ in range(max_tries):
        i = max(text.rfind("\\boxed", 0, end), text.rfind("\\fbox", 0, end))
        if i < 0 or len(out) >= max_boxes:
            break
        name_end = i + (len("\\boxed") if text.startswith("\\boxed", i) else len("\\fbox"))
        j = name_end
        while j < len(text) and text[j] == " ":
            j += 1
        if j < len(text) and text[j] == "{":
            content = _balanced_braces(text, j)
            if content is not None:
                out.append(content)
        elif name_end < j < len(text):                  # `\boxed 5`: one space-delimited token
            token = text[j:].split(maxsplit=1)[0].rstrip("$.")
            if token:
                out.append(token)
        end = i
    return out


def last_boxed(text):
    """Content of the last complete `\\boxed{...}` in text, or None."""
    boxes = boxed_contents(text, max_boxes=1)
    return boxes[0] if boxes else None


def _squash(s):
    """Text for string comparison: `\\text{}` unwrapped, no whitespace, `$` and final `.`
    stripped, case-folded; `(B)` -> `b`."""
    s = re.sub(r"\\(?:text|mathrm|mbox|textbf|mathbf)\{([^{}]*)\}", r"\1", s)
    s = "".join(s.split()).strip("$.").casefold()
    if len(s) == 3 and s[0] == "(" and s[2] == ")":
        s = s[1]
    return s


def extract_final_answer(text):
    """(answer, how) from an answer part (see answer_part); how is "boxed", "answer_phrase",
    "bare", "several_boxed" or None.

    Order: the last \\boxed{}; else the rest of the line after the last "answer" ("The final
    answer is 3/4.", "Answer: 12"); else the whole text if it is short (a bare "42"). Two
    different \\boxed{} answers are a hedge: no answer ("several_boxed"). We never fall back
    to "the last number anywhere": that would reward listing many numbers.
    """
    boxes = boxed_contents(text)
    if len({_squash(b) for b in boxes}) > 1:
        return None, "several_boxed"
    if boxes:
        return boxes[0].strip(), "boxed"
    k = text.lower().rfind("answer")
    if k >= 0:
        rest = text[k + len("answer"):].split("\n", 1)[0].strip()
        rest = re.sub(r"^(?:is\b)?\s*[:=]?\s*", "", rest).strip().rstrip(".").strip()
        if rest:
            return rest[:256], "answer_phrase"
    if 0 < len(text) <= MAX_BARE_CHARS:
        return text.rstrip("."), "bare"
    return None, None


# -----------------------------------------------------------------------------
# 2. Math answers: the project's rules in front, Math-Verify behind
# -----------------------------------------------------------------------------
# The final answer (section 1) is compared with the ground truth in this order:
#   1. size bounds: an answer over MAX_EXPR_CHARS, nested deeper than MAX_DEPTH, with more
#      than MAX_POWERS powers, a number over 64 digits, a 4-digit or nested exponent
#      (`10^{2000}`, `9^{9^{9}}`) or a factorial of 4+ digits is refused before any algebra
#      runs (sympy would otherwise spend seconds on it);
#   2. equal as text (case, spaces, `\text{}`, `$`, `(B)` ignored): "Red Circle", "(B)";
#   3. when the truth is one value (a number, an expression, a letter), hedges are refused:
#      `11 \lor 12`, `3 or 4`, `3 and 4`, `either` (`x = 3 \text{ or } x = -3` is fine for
#      the truth `\pm 3`, which is a set);
#   4. when the truth is a number, the answer must be one too: what stands after its last `=`
#      is read (`x = 5`, `8 + 6 = 14`), and arithmetic left undone between numerals (`8+6`,
#      `2 \times 7`, `3(4)`, `12 \div 4`) is refused; fractions, powers, roots, logs and
#      scientific notation are values (`\frac{3}{4}`, `2^{10}`, `\sqrt{8}`, `\log_2 8`,
#      `3 \times 10^5`). A trailing unit is dropped (`5 cm`, `5\,\text{cm}^2`, `5 km/h`,
#      `5 m^2`, `\$5`, `5 dollars`): the question fixes the unit, and a wrong one is not caught;
#   5. Math-Verify (`parse` of both in `$...$`, then `verify(gold, answer)`), which decides the
#      rest (we first remove thousands separators written `1\,000` or `1{,}000`, which it
#      would read as a product); its choices, kept as ours:
#      - decimals vs fractions: equal when they agree after rounding to 6 decimal places
#        (0.333333 = 1/3 and 0.7500001 = 3/4, but 0.33 != 1/3);
#      - percent: `50\%` equals 50 and 0.5 (the truth may state the percentage or the ratio);
#      - mixed numbers: `2\frac{1}{2}` is 5/2, never 2 * 1/2;
#      - sets are unordered (`\{2,1\}` = `\{1,2\}`), intervals keep their brackets
#        (`\left(0,1\right]` = `(0,1]` != `[0,1]`), `x = \pm 3` = `\pm 3` = `3, -3`;
#      - equations compare as equations: `y=3` != `x=3`, `x = 5` = `5`;
#      - expressions compare symbolically: `x^2+1` = `1+x^2`, `2x` = `x \cdot 2`;
#      - `(1, 2)` is ambiguous (open interval or pair); against a set truth it reads as a pair.
# Math-Verify's own time limits (MATH_VERIFY_TIMEOUT_S, twice) stay below the pool's per-item
# timeout, which is the last guard.

MAX_EXPR_CHARS = 256
MAX_DEPTH = 16                 # brackets nested deeper than this are refused
MAX_POWERS = 8                 # and so are answers with more than this many `^`
MATH_VERIFY_TIMEOUT_S = 3

_TOO_LARGE = re.compile(r"\d{65}|\^\s*\{?\s*[-+]?\s*\d{4}|\^\s*\{[^{}]*\^|\^\s*[-+]?[\d.]+\s*\^"
                        r"|\d{4}\s*!|\\sqrt\s*\[\s*\d{3}")
_THOUSANDS = re.compile(r"(?<=\d)(?:\\,|\\ |\{,\})(?=\d{3}(?!\d))")     # 1\,000 1{,}000
_HEDGE = re.compile(r"\\lor|\\vee|\\land|\\wedge|\b(?:or|and|either)\b", re.IGNORECASE)
# arithmetic left undone: a numeral or a closing brace, an operator, then a numeral or a
# fraction (`8+6`, `\frac{1}{2}+\frac{1}{2}`, `10^{3}-1`), or a numeral times a parenthesis
# (`3(4)`); `\times 10^k` is scientific notation, not arithmetic
_UNDONE = re.compile(r"(?:(?<![A-Za-z_.\d])\d+(?:\.\d+)?|\})\s*(?:[-+*\u00d7\u00b7\u00f7\u2212]|"
                     r"\\times|\\cdot|\\div)(?!\s*10\s*\^)\s*\(?\s*(?:\.?\d|\\[dt]?frac)|\d\s*\(\s*\d")
_UNIT = re.compile(r"^(.*?[\d}])\s*(?:\\[,;:! ]\s*)*(?:\\(?:text|mathrm|mbox)\{\s*([^{}]*?)\s*\}|"
                   r"([A-Za-z]+(?:\s*/\s*[A-Za-z]+)?))\s*(?:\^\s*\{?[23]\}?)?\s*\.?$")
UNITS = frozenset(
    "mm cm m km in inch inches ft feet foot yd yard yards mi mile miles g kg mg lb lbs pound pounds "
    "oz s sec second seconds min minute minutes h hr hour hours day days week weeks year years "
    "ml l liter liters litre litres cm2 m2 km/h m/s mph kph mi/h ft/s degree degrees deg rad "
    "radians dollar dollars cent cents usd units unit square sq percent meter meters metre metres "
    "centimeter centimeters kilometer kilometers".split())


class MathVerifyMissing(ImportError):
    """Raised (never swallowed) when a math reward is needed and Math-Verify is not installed."""


@functools.lru_cache(maxsize=None)
def require_math_verify():
    """The math_verify module, imported on first use (with sympy: about 0.5 s, measured)."""
    try:
        import math_verify
    except ImportError as e:
        raise MathVerifyMissing(
            f"math rewards check answers with Math-Verify, which is not installed ({e}): "
            f"pip install -e '.[train]'  (or: pip install math-verify)") from None
    return math_verify


@functools.lru_cache(maxsize=4096)
def _parse_math(text):
    """Math-Verify's parse of `$text$`: a list (sympy value, string), empty if it cannot read it.
    Cached: the ground truth of a group is parsed once per worker, not once per response."""
    text = _THOUSANDS.sub("", text)
    return require_math_verify().parse("$" + text + "$", parsing_timeout=MATH_VERIFY_TIMEOUT_S)


def _drop_unit(text):
    m = _UNIT.match(text.strip())
    if m and (m.group(2) or m.group(3) or "").replace(" ", "").casefold() in UNITS:
        return m.group(1).strip()
    return text


def _too_large(text):
    depth = deepest = 0
    for c in text:
        depth += (c in "({[") - (c in ")}]")
        deepest = max(deepest, depth)
    return (len(text) > MAX_EXPR_CHARS or deepest > MAX_DEPTH or text.count("^") > MAX_POWERS
            or _TOO_LARGE.search(text) is not None)


def answers_match(pred, truth):
    """(matched?, how) for a final answer against a ground truth, by the rules above; how is
    "too_large", "string", "hedge", "unevaluated", "unparsed" or "math_verify"."""
    if _too_large(pred):
        return False, "too_large"
    if _squash(pred) == _squash(truth):
        return True, "string"
    gold = _parse_math(truth)
    if not gold:
        return False, "unparsed"
    import sympy                                   # loaded by math_verify already
    if isinstance(gold[0], sympy.Expr) and _HEDGE.search(re.sub(r"\\text\{([^{}]*)\}", r" \1 ", pred)):
        return False, "hedge"
    if getattr(gold[0], "is_Number", False):
        pred = _drop_unit(pred.rsplit("=", 1)[-1])
        if _UNDONE.search(pred):
            return False, "unevaluated"
    target = _parse_math(pred)
    if not target:
        return False, "unparsed"
    ok = require_math_verify().verify(gold, target, timeout_seconds=MATH_VERIFY_TIMEOUT_S)
    return bool(ok), "math_verify"


# -----------------------------------------------------------------------------
# 3. Reward functions: f(response, ground_truth, **meta) -> (reward in [0, 1], components)
# -----------------------------------------------------------------------------
# Components are for logging: numbers are averaged per task in the metrics, strings (the
# extracted answer, an error) are shown by --debug. Malformed model output scores 0; only a
# malformed *ground truth* raises (a ValueError naming it), which the router turns into 0 plus an
# `error` component.
#
# Coordinates: a box is [x1, y1, x2, y2] in absolute pixels of the image the model sees (after
# resizing; the Qwen2.5-VL convention), with x2 and y2 exclusive: the box covers the pixel
# columns x1 .. x2-1 and rows y1 .. y2-1, as synthetic.py draws them. So its area is
# (x2 - x1) * (y2 - y1), and a point (x, y) is inside when x1 <= x < x2 and y1 <= y < y2.
# Times are seconds; a span [start, end] is read from `[mm:ss,mm:ss]` (see parse_span).

def math_reward(response, ground_truth, /, **meta):
    """1 if the final answer (section 1) equals the ground truth by the rules of section 2."""
    answer, how = extract_final_answer(answer_part(response))
    if answer is None:
        return 0.0, {"correct": 0.0, "extracted": None, "extracted_by": how}
    ok, match = answers_match(answer, str(ground_truth))
    return float(ok), {"correct": float(ok), "extracted": answer[:64], "extracted_by": how,
                       "match": match}


_NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
                 "ten", "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen",
                 "seventeen", "eighteen", "nineteen", "twenty"]
_COUNT_TOKEN = re.compile(r"(?<![0-9.])[0-9]{1,12}(?:\.[0-9]{1,6})?(?![0-9])|\b(?:"
                          + "|".join(_NUMBER_WORDS) + r")\b", re.IGNORECASE)


def parse_count(text):
    """The count a text states: its one number (digits, or a word zero..twenty). None if it has
    none, several different ones ("3 red and 2 blue" is ambiguous, not 2), or a fraction."""
    value = None
    for m in _COUNT_TOKEN.finditer(text[:MAX_ANSWER_CHARS]):
        token = m.group(0).lower()
        v = Fraction(_NUMBER_WORDS.index(token) if token in _NUMBER_WORDS else token)
        if value is not None and v != value:
            return None
        value = v
    return int(value) if value is not None and value.denominator == 1 else None


def count_reward(response, ground_truth, /, **meta):
    """1 if the count read from the answer equals the ground truth: from the \\boxed{} or the
    "answer is" phrase if there is one, else from the whole answer (parse_count)."""
    truth = ground_truth if isinstance(ground_truth, int) else parse_count(str(ground_truth))
    if truth is None or isinstance(truth, bool):
        raise ValueError(f"count ground truth must be an integer, got {ground_truth!r}")
    text = answer_part(response)
    answer, how = extract_final_answer(text)
    pred = None if how == "several_boxed" else parse_count(
        answer if how in ("boxed", "answer_phrase") else text)
    ok = pred is not None and pred == truth
    return float(ok), {"correct": float(ok), "pred": pred}


_NUM = r"(-?[0-9]{1,9}(?:\.[0-9]{1,9})?)"
_BBOX_KEY = re.compile(r"[\"']?bbox_2d[\"']?\s*:\s*\[\s*" + r"\s*,\s*".join([_NUM] * 4) + r"\s*\]")
_BARE_BOX = re.compile(r"(?<![0-9.])" + r"\s*,\s*".join([_NUM] * 4) + r"(?![0-9.])")
_POINT_KEY = re.compile(r"[\"']?point_2d[\"']?\s*:\s*\[\s*" + _NUM + r"\s*,\s*" + _NUM + r"\s*\]")
_BARE_POINT = re.compile(r"[\[(]\s*" + _NUM + r"\s*,\s*" + _NUM + r"\s*[\])]")
MAX_PREDICTIONS = 32


def parse_boxes(text):
    """Boxes [x1, y1, x2, y2] predicted in text.

    Reads every `"bbox_2d": [x1, y1, x2, y2]` (one Qwen-style JSON object, a list of them, inside
    ```json fences or not, even in broken JSON); if there is none, every run of four
    comma-separated numbers (`[10, 20, 30, 40]`). Coordinates are sorted so x1 <= x2, y1 <= y2.
    """
    matches = _BBOX_KEY.findall(text) or _BARE_BOX.findall(text)
    boxes = []
    for m in matches[:MAX_PREDICTIONS]:
        x1, y1, x2, y2 = map(float, m)
        boxes.append([min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2)])
    return boxes


def parse_points(text):
    """Points [x, y] from `"point_2d": [x, y]` objects, or else bracketed `[x, y]`, `(x, y)`."""
    matches = _POINT_KEY.findall(text) or _BARE_POINT.findall(text)
    return [[float(x), float(y)] for x, y in matches[:MAX_PREDICTIONS]]


def _truth_boxes(ground_truth):
    """Ground-truth boxes from [x1,y1,x2,y2], {"bbox_2d": [...]}, a list of those, or their JSON."""
    gt = json.loads(ground_truth) if isinstance(ground_truth, str) else ground_truth
    if isinstance(gt, dict):
        gt = [gt]
    if isinstance(gt, (list, tuple)) and len(gt) == 4 and all(
            isinstance(v, (int, float)) for v in gt):
        gt = [gt]
    boxes = []
    for item in gt if isinstance(gt, (list, tuple)) else [None]:
        box = item.get("bbox_2d") if isinstance(item, dict) else item
        if not (isinstance(box, (list, tuple)) and len(box) == 4
                and all(isinstance(v, (int, float)) for v in box)):
            raise ValueError(f"ground-truth box must be [x1, y1, x2, y2] or "
                             f"{{\"bbox_2d\": [...]}}, got {ground_truth!r}")
        x1, y1, x2, y2 = map(float, box)
        boxes.append([min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2)])
    if not boxes:
        raise ValueError(f"ground truth holds no box: {ground_truth!r}")
    return boxes


def box_iou(a, b):
    """(IoU, union area) of boxes [x1, y1, x2, y2]; IoU of two empty boxes is 1 if they are equal."""
    inter_w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    inter = inter_w * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return (inter / union if union > 0 else float(a == b)), union


def giou(a, b):
    """Generalised IoU of boxes [x1, y1, x2, y2]: IoU - (area(C) - union) / area(C), C the
    smallest box enclosing both; in [-1, 1], and 1 only for identical boxes."""
    iou, union = box_iou(a, b)
    hull = (max(a[2], b[2]) - min(a[0], b[0])) * (max(a[3], b[3]) - min(a[1], b[1]))
    return iou - (hull - union) / hull if hull > 0 else iou


def _greedy_match(scores, n_truth, n_pred):
    """Sum of scores of a one-to-one greedy matching (best pair first), divided by
    max(n_truth, n_pred): missing and extra predictions both count as 0."""
    pairs = sorted(((s, i, j) for i, row in enumerate(scores) for j, s in enumerate(row)),
                   reverse=True)
    used_t, used_p, total = set(), set(), 0.0
    for s, i, j in pairs:
        if i not in used_t and j not in used_p:
            used_t.add(i)
            used_p.add(j)
            total += s
    return total / max(n_truth, n_pred, 1)


def ground_reward(response, ground_truth, /, **meta):
    """GIoU between predicted and ground-truth boxes, clipped at 0: max(0, GIoU) in [0, 1].

    The report does not say how GIoU in [-1, 1] is mapped to [0, 1]. We measured the obvious
    (GIoU + 1) / 2 being gamed: a degenerate or far-too-large box scores about 0.5 whatever the
    image shows, and a tiny policy's RL run raised that reward from 0.30 to 0.49 while its
    Acc@0.5 fell from 0.07 to 0. Clipped at 0, a box earns reward only by overlapping the target.
    With several boxes, predictions and truths are matched one-to-one (greedy on the reward) and
    the sum is divided by max(#truth, #predicted), so extra boxes are penalised. No box: 0.
    The `iou` component is the same matching on plain IoU (evaluation's Acc@0.5 reads it).
    """
    truth = _truth_boxes(ground_truth)
    boxes = parse_boxes(answer_part(response))
    if not boxes:
        return 0.0, {"parsed": 0.0, "iou": 0.0}
    reward = _greedy_match([[max(0.0, giou(p, t)) for p in boxes] for t in truth],
                           len(truth), len(boxes))
    iou = _greedy_match([[box_iou(p, t)[0] for p in boxes] for t in truth], len(truth), len(boxes))
    return reward, {"parsed": 1.0, "n_boxes": float(len(boxes)), "iou": iou}


def point_reward(response, ground_truth, /, **meta):
    """1 if the predicted point lies inside the ground-truth box (x2, y2 exclusive: see the
    coordinates note above). Several points or boxes are matched one-to-one, as for boxes."""
    truth = _truth_boxes(ground_truth)
    points = parse_points(answer_part(response))
    if not points:
        return 0.0, {"inside": 0.0, "parsed": 0.0}
    scores = [[float(t[0] <= x < t[2] and t[1] <= y < t[3]) for x, y in points] for t in truth]
    reward = _greedy_match(scores, len(truth), len(points))
    return reward, {"inside": reward, "parsed": 1.0, "n_points": float(len(points))}


def normalise_ocr(text):
    """NFKC, case-folded, punctuation removed, whitespace runs collapsed to one space."""
    text = unicodedata.normalize("NFKC", text).casefold()
    text = "".join(c for c in text if not unicodedata.category(c).startswith("P"))
    return " ".join(text.split())


def edit_similarity(a, b, max_chars=400):
    """1 - Levenshtein(a, b) / max(len): 1 for equal strings, 0 for nothing in common. Strings
    are cut to max_chars first, so the value is approximate (and cheap) for long ones."""
    a, b = a[:max_chars], b[:max_chars]
    if not a and not b:
        return 1.0
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return 1.0 - prev[-1] / max(len(a), len(b))


def ocr_reward(response, ground_truth, /, **meta):
    """1 if the answer (the \\boxed{} content, else the whole answer) equals the ground-truth
    text after normalise_ocr; edit similarity is a component only (the reward stays a match,
    as in the report). Evaluation's exact-match scorer (captions, OCR) is this reward."""
    if not isinstance(ground_truth, str):
        raise ValueError(f"text ground truth must be a string, got {ground_truth!r}")
    text = answer_part(response)
    answer, how = extract_final_answer(text)
    if how == "several_boxed":
        return 0.0, {"exact": 0.0, "edit_similarity": 0.0}
    pred, truth = normalise_ocr(answer if how == "boxed" else text), normalise_ocr(ground_truth)
    exact = float(pred == truth)
    return exact, {"exact": exact, "edit_similarity": edit_similarity(pred, truth)}


_TIME = r"((?:[0-9]{1,3}:){0,2}[0-9]{1,6}(?:\.[0-9]{1,6})?)"
_SPAN = _TIME + r"\s*(?:,|-|\u2013|~|to)\s*" + _TIME
_BRACKET_SPAN = re.compile(r"\[\s*" + _SPAN + r"\s*\]")
_BARE_SPAN = re.compile(r"^\s*" + _SPAN + r"\s*$")


def parse_seconds(token):
    """`mm:ss`, `hh:mm:ss`, `ss` or `ss.s` (decimals allowed in the last field) -> seconds."""
    value = 0.0
    for part in token.split(":"):
        value = value * 60.0 + float(part)
    return value


def parse_span(text):
    """The last `[mm:ss,mm:ss]` in text (also `[12.5, 20]` seconds, `hh:mm:ss`, `-`/`to`
    separators, or a bare `00:10 to 00:20` as the whole text) -> (start, end) seconds."""
    spans = _BRACKET_SPAN.findall(text) or _BARE_SPAN.findall(text)
    if not spans:
        return None
    a, b = parse_seconds(spans[-1][0]), parse_seconds(spans[-1][1])
    return min(a, b), max(a, b)


def _truth_span(ground_truth):
    """(start, end) seconds from `"[mm:ss,mm:ss]"` or [start_s, end_s]."""
    if isinstance(ground_truth, str):
        span = parse_span(ground_truth)
    elif isinstance(ground_truth, (list, tuple)) and len(ground_truth) == 2 and all(
            isinstance(v, (int, float)) for v in ground_truth):
        span = (min(map(float, ground_truth)), max(map(float, ground_truth)))
    else:
        span = None
    if span is None:
        raise ValueError(f"temporal ground truth must be '[mm:ss,mm:ss]' or [start_s, end_s], "
                         f"got {ground_truth!r}")
    return span


def temporal_iou(a, b):
    inter = max(0.0, min(a[1], b[1]) - max(a[0], b[0]))
    union = max(a[1], b[1]) - min(a[0], b[0])
    return inter / union if union > 0 else float(a == b)


def temporal_iou_reward(response, ground_truth, /, **meta):
    """Temporal IoU between the predicted and ground-truth spans; 0 when no span can be read."""
    truth = _truth_span(ground_truth)
    span = parse_span(answer_part(response))
    if span is None:
        return 0.0, {"tiou": 0.0, "parsed": 0.0}
    iou = temporal_iou(span, truth)
    return iou, {"tiou": iou, "parsed": 1.0}


_LEAD_IN = re.compile(r"^(?:the\s+)?(?:correct\s+|final\s+)?(?:answer|option|choice|image)\s*"
                      r"(?:is\b)?\s*:?\s*", re.IGNORECASE)
_LEADING_OPTION = re.compile(r"^\(?\s*([A-Za-z]|[0-9]{1,2})\s*\)?(?![A-Za-z0-9])")


def parse_choice(text):
    """The option a short answer chooses: a letter or a number of at most two digits, standing
    at the start of the answer, after an optional lead-in ("Image 2", "Option (B)", "The
    correct option is C", "**B**", "B. Paris"). "A" and "I" followed by a lowercase word are
    words, not options ("A red one"); a hedge ("1 or 2") chooses nothing; so does a sentence
    with the option inside it ("at row 2, column 3"): stray numbers must not choose.
    """
    text = text[:MAX_BARE_CHARS].replace("*", "").strip()
    if _HEDGE.search(text):
        return None
    m = _LEADING_OPTION.match(_LEAD_IN.sub("", text, count=1))
    if m is None:
        return None
    rest = m.string[m.end():]
    if m.group(1) in ("A", "I", "a") and re.match(r"\s+[a-z]", rest):
        return None
    return m.group(1)


def choice_reward(response, ground_truth, /, **meta):
    """1 if the chosen option (parse_choice of the \\boxed{} content, the "answer is" phrase, or
    the start of the answer) equals the ground-truth option, case-insensitively."""
    truth = str(ground_truth).strip().strip("()").casefold()
    if not truth or len(truth) > 16:
        raise ValueError(f"choice ground truth must be a short option such as 'B' or '2', "
                         f"got {ground_truth!r}")
    text = answer_part(response)
    answer, how = extract_final_answer(text)
    if how is None:                                 # a long answer without "answer": its start
        answer = text
    pred = parse_choice(answer) if answer is not None else None
    ok = pred is not None and pred.casefold() == truth
    return float(ok), {"correct": float(ok), "pred": pred}


# The Bradley-Terry reward model is a model on an accelerator, in the training process or in a
# process of its own (reward_model.RewardModelServer); train_rl registers a scoring function once
# it is loaded, and the pool scores its task inline (inline_tasks).
_reward_model = None


def register_reward_model(fn):
    """Route the "preference" task to fn(response, ground_truth, **meta) -> score in [0, 1] (a
    float, or (float, components)). Pass None to unregister."""
    global _reward_model
    _reward_model = fn


def preference_reward(response, ground_truth, /, **meta):
    """The reward model's score (e.g. sigmoid of the Bradley-Terry logit) of the whole response.
    A non-finite score or numeric component (a NaN logit that a clamp then turned into a
    confident 1.0) scores 0 with an `error` component."""
    if _reward_model is None:
        raise ValueError("task 'preference' needs a reward model: call "
                         "register_reward_model(fn) first (train_rl.py --train-rm trains one)")
    out = _reward_model(response, ground_truth, **meta)
    score, components = out if isinstance(out, tuple) else (out, {})
    score = float(score)
    bad = [k for k, v in {"score": score, **components}.items()
           if isinstance(v, float) and not math.isfinite(v)]
    if bad:
        return 0.0, {**components, "error": f"reward model returned non-finite {', '.join(bad)}"}
    return score, {"rm_score": score, **components}


# -----------------------------------------------------------------------------
# 4. The reward router and the pass threshold of every reward
# -----------------------------------------------------------------------------

REWARDS = {
    "reasoning": math_reward,          # visual reasoning (STEM), answer in \boxed{}
    "math": math_reward,
    "text_reasoning": math_reward,     # text-only math
    "count": count_reward,
    "video_count": count_reward,
    "ground": ground_reward,           # boxes, GIoU
    "point": point_reward,             # point in box
    "ocr": ocr_reward,
    "video_ground": temporal_iou_reward,
    "choice": choice_reward,           # multiple choice (which image has more ...)
    "preference": preference_reward,   # the Bradley-Terry reward model
}

# synthetic.py names the reward of each synthetic RL prompt in its `reward` field; the router tag for
# each of those names. A prompt without a `reward` is open-ended: the reward model scores it.
DATA_REWARDS = {"count": "count", "giou": "ground", "point_in_box": "point", "ocr": "ocr",
                "math": "math", "tiou": "video_ground", "choice": "choice",
                "reward_model": "preference"}


def reward_tag(prompt):
    """The router tag of an RL prompt (a synthetic.py sample): from its `reward` field."""
    name = prompt.get("reward", "reward_model")
    return DATA_REWARDS.get(name, name)


# One pass definition per reward, used for the pass-rate metric and for "solved" (MiMo-7B's easy
# pool: a prompt whose every sample passes): binary rewards pass at 1; the clipped GIoU, the
# temporal IoU and a reward-model score pass at 0.5. (Evaluation's Acc@0.5 for boxes is the
# usual IoU >= 0.5; GIoU <= IoU, so a passed box is always an Acc@0.5 hit.)
PASS_AT = {"ground": 0.5, "video_ground": 0.5, "preference": 0.5}


def passed(tag, reward):
    """Whether `reward` of the task tagged `tag` counts as solved (PASS_AT, else 1)."""
    return reward >= PASS_AT.get(tag, 1.0) - 1e-9


def register_reward(task, fn):
    """Add or replace the reward of a task tag. With a RewardPool, register before creating the
    pool: forked workers see the registry as it was when they started."""
    REWARDS[task] = fn


def compute_reward(task, response, ground_truth, /, **meta):
    """(reward in [0, 1], components) for one response; never raises on model output.

    An unknown task, a non-string response, a reward function that raises (e.g. on a malformed
    ground truth) or returns NaN all give reward 0 with an `error` component naming the cause.
    Only a missing Math-Verify is raised (MathVerifyMissing): every math reward would be 0.
    """
    fn = REWARDS.get(task)
    if fn is None:
        return 0.0, {"error": f"unknown task {task!r}; known tasks: {sorted(REWARDS)}"}
    if not isinstance(response, str):
        return 0.0, {"error": f"response must be a string, got {type(response).__name__}"}
    try:
        reward, components = fn(response, ground_truth, **meta)
        reward = float(reward)
    except MathVerifyMissing:
        raise
    except Exception as e:                     # noqa: BLE001 — a reward must never crash the run
        return 0.0, {"error": f"{type(e).__name__} in {task!r} reward: {e}"[:300]}
    if not math.isfinite(reward):
        return 0.0, {**components, "error": f"reward was {reward}"}
    return min(1.0, max(0.0, reward)), components


# -----------------------------------------------------------------------------
# 5. The reward pool (Reward-as-a-Service)
# -----------------------------------------------------------------------------
# Each worker is a process with its own duplex pipe. The parent hands one item at a time to an
# idle worker and waits on all busy pipes with a deadline; a worker that overruns its item's
# timeout is killed and replaced, and the item scores 0 with a `timeout` component. Per-worker
# pipes (not a shared queue) mean a killed worker can never leave a half-written message where
# others read. Items and results cross the pipe as JSON (no pickle), so ground truths and
# components must be JSON values, as they are in the JSONL data.

def _reward_worker(conn):
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # Ctrl-C is the parent's to handle
    while True:
        try:
            message = conn.recv_bytes()
        except EOFError:
            return
        if not message:                             # b"": the pool is closing
            return
        result = _score_item(*json.loads(message))
        conn.send_bytes(json.dumps(result, default=str).encode())


def _score_item(task, response, ground_truth, meta):
    if meta is not None and not isinstance(meta, dict):
        return 0.0, {"error": f"meta must be a dict or None, got {type(meta).__name__}"}
    return compute_reward(task, response, ground_truth, **(meta or {}))


class RewardPool:
    """Score (task, response, ground_truth, meta) items in `num_workers` processes.

        with RewardPool(num_workers=2, timeout_s=5.0) as pool:
            results = pool.score([("count", "3", 3, {}), ...])   # [(reward, components), ...]

    num_workers=0 scores inline in the calling process (no timeout then). Tasks in
    `inline_tasks` ("preference": the reward model is a model in this process) are always scored
    inline. The start method defaults to fork where available, so rewards registered with
    register_reward before the pool starts are seen by the workers, and so is Math-Verify,
    imported here once (measured in this project: 800 items, half of them math, in 1.2 s with
    two workers on a shared 2-core machine, against 0.15 s with the old hand-written parser).
    """

    def __init__(self, num_workers=0, timeout_s=10.0, start_method=None,
                 inline_tasks=("preference",)):
        if not (isinstance(num_workers, int) and num_workers >= 0):
            raise ValueError(f"num_workers must be an integer >= 0, got {num_workers!r}")
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s!r}")
        if start_method is None:
            start_method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
        self.timeout_s, self.inline_tasks = timeout_s, set(inline_tasks)
        self._ctx = mp.get_context(start_method)
        if num_workers and start_method == "fork":
            try:                # import it once here: forked workers then start with it loaded
                require_math_verify()
            except MathVerifyMissing:
                pass            # raised by score() if a math reward is ever asked for
        self._workers = [self._start_worker() for _ in range(num_workers)]

    def _start_worker(self):
        parent_end, child_end = self._ctx.Pipe(duplex=True)
        process = self._ctx.Process(target=_reward_worker, args=(child_end,), daemon=True)
        process.start()
        child_end.close()
        return process, parent_end

    def _replace_worker(self, w):
        process, conn = self._workers[w]
        process.kill()
        process.join(timeout=5)
        conn.close()
        self._workers[w] = self._start_worker()

    def score(self, items):
        """[(reward, components)] for [(task, response, ground_truth, meta)], in order."""
        items = list(items)
        if any(REWARDS.get(item[0]) is math_reward for item in items):
            require_math_verify()       # a clear error here, and workers forked later inherit it
        results = [None] * len(items)
        pending = deque()
        for i, item in enumerate(items):
            if not self._workers or item[0] in self.inline_tasks:
                results[i] = _score_item(*item)
            else:
                pending.append(i)
        busy = {}                                   # worker index -> (item index, deadline)
        while pending or busy:
            for w in range(len(self._workers)):
                if w in busy or not pending:
                    continue
                i = pending.popleft()
                try:
                    message = json.dumps(list(items[i])).encode()
                except (TypeError, ValueError) as e:
                    results[i] = (0.0, {"error": f"item is not JSON-serialisable: {e}"})
                    continue
                try:
                    self._workers[w][1].send_bytes(message)
                except OSError:                     # the worker died while idle: retry the item
                    self._replace_worker(w)
                    pending.appendleft(i)
                    continue
                busy[w] = (i, time.monotonic() + self.timeout_s)
            if not busy:
                continue
            wait_s = max(0.0, min(deadline for _, deadline in busy.values()) - time.monotonic())
            conn_to_worker = {self._workers[w][1]: w for w in busy}
            for conn in mp.connection.wait(list(conn_to_worker), timeout=wait_s):
                w = conn_to_worker[conn]
                i, _ = busy.pop(w)
                try:
                    reward, components = json.loads(conn.recv_bytes())
                    results[i] = (float(reward), components)
                except (EOFError, OSError, ValueError) as e:      # the worker died (e.g. OOM)
                    results[i] = (0.0, {"error": f"reward worker died: {type(e).__name__}"})
                    self._replace_worker(w)
            now = time.monotonic()
            for w, (i, deadline) in list(busy.items()):
                if deadline <= now:
                    del busy[w]
                    results[i] = (0.0, {"timeout": 1.0,
                                        "error": f"reward took longer than {self.timeout_s}s"})
                    self._replace_worker(w)
        return results

    def close(self):
        # An explicit stop message, not just closing the pipe: forked siblings hold copies of
        # every pipe end, so a worker might never read EOF.
        for process, conn in self._workers:
            try:
                conn.send_bytes(b"")
            except OSError:
                pass
        for process, conn in self._workers:
            process.join(timeout=1)
            conn.close()
            if process.is_alive():
                process.kill()
                process.join()
        self._workers = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

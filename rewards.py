"""
rewards.py — reading answers out of model responses and scoring them: every reward of MiMo-VL's
RL (MiMo-VL report §3.2-3.3), the router that picks one per task, and the reward pool that runs
them in worker processes with a per-item timeout (the report's "Reward-as-a-Service").

Every reward is a plain function `reward(response, ground_truth, **meta) -> float in [0, 1]`;
it never raises on model text and never executes it. Evaluation (evaluate.py) scores answers
with the same functions, so training and evaluation share one convention per concept.

This module imports neither torch nor the model, so reward workers start fast.

Sections:
  1. Reading the answer out of a response (think block, size bound, \\boxed{})
  2. A safe arithmetic parser (recursive descent, bounded)
  3. Reward functions
  4. The reward router
  5. The reward pool (Reward-as-a-Service)
"""

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


def answer_part(response):
    """The part of a response that is scored: the text after the last `</think>`.

    If the response has no `</think>` the whole response is scored. MiMo-VL may answer without
    thinking (no-think mode, or easy queries), and scoring 0 whenever the tag is missing would be
    a format reward, which the report explicitly does not use. The price: a response truncated in
    the middle of its thinking is scored as if its thoughts were the answer (a final \\boxed{}
    is then usually missing anyway; the truncation rate is logged).
    """
    if not isinstance(response, str):
        return ""
    cut = response.rfind("</think>")
    text = response[cut + len("</think>"):] if cut >= 0 else response
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


def last_boxed(text, max_tries=8):
    """Content of the last complete `\\boxed{...}` (or `\\fbox{...}`, `\\boxed 5`) in text.

    Nested braces are balanced (`\\boxed{\\frac{1}{2}}` -> `\\frac{1}{2}`); a `\\boxed{` that never
    closes (truncated output) is skipped for the one before it, at most `max_tries` times.
    """
    end = len(text)
    for _ in range(max_tries):
        i = max(text.rfind("\\boxed", 0, end), text.rfind("\\fbox", 0, end))
        if i < 0:
            return None
        name_end = i + (len("\\boxed") if text.startswith("\\boxed", i) else len("\\fbox"))
        j = name_end
        while j < len(text) and text[j] == " ":
            j += 1
        if j < len(text) and text[j] == "{":
            content = _balanced_braces(text, j)
            if content is not None:
                return content
        elif name_end < j < len(text):                  # `\boxed 5`: one space-delimited token
            token = text[j:].split(maxsplit=1)[0].rstrip("$.")
            if token:
                return token
        end = i
    return None


def extract_final_answer(text):
    """(answer string, how) from an answer part: how is "boxed", "answer_phrase", "bare" or None.

    Order: the last \\boxed{}; else the rest of the line after the last "answer" ("The final
    answer is 3/4.", "Answer: 12"); else the whole text if it is short (a bare "42"). We do not
    fall back to "the last number anywhere": that would reward listing many numbers.
    """
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed.strip(), "boxed"
    k = text.lower().rfind("answer")
    if k >= 0:
        rest = text[k + len("answer"):].split("\n", 1)[0].strip()
        rest = re.sub(r"^(?:is\b)?\s*[:=]?\s*", "", rest).strip().rstrip(".").strip()
        if rest:
            return rest[:256], "answer_phrase"
    if 0 < len(text) <= 64:
        return text.rstrip("."), "bare"
    return None, None


# -----------------------------------------------------------------------------
# 2. A safe arithmetic parser
# -----------------------------------------------------------------------------
# Answers such as `-2.5`, `1,000`, `3/4`, `\frac{3}{4}`, `2^3`, `2\sqrt{2}`, `50\%` are parsed by a
# small recursive-descent parser into an exact Fraction (or a float once sqrt/pi/non-integer
# powers appear). Every size is bounded, so no input can make it slow or huge.

MAX_EXPR_CHARS = 256
MAX_NUMBER_DIGITS = 64
MAX_EXPONENT = 1024            # integer powers are also bounded by MAX_FRACTION_BITS
MAX_FRACTION_BITS = 4096
MAX_DEPTH = 32

_LATEX_COMMANDS = {            # command -> token; None means "ignore"
    "frac": "frac", "dfrac": "frac", "tfrac": "frac", "sqrt": "sqrt", "pi": "pi",
    "cdot": "*", "times": "*", "div": "/", "left": None, "right": None, "displaystyle": None,
    "quad": None, "qquad": None,
}
_UNICODE_OPS = {"\u2212": "-", "\u00d7": "*", "\u00b7": "*", "\u22c5": "*", "\u00f7": "/",
                "\u03c0": "pi"}


class _ParseError(ValueError):
    pass


def _tokenize(s):
    """Tokens: Fraction numbers, operators + - * / ^ ( ) { } [ ], and 'frac' 'sqrt' 'pi'."""
    tokens, i, n = [], 0, len(s)
    digits = "0123456789"        # ASCII only: str.isdigit() accepts '²' and Arabic-Indic digits
    while i < n:
        c = s[i]
        if c in " \t\n":
            i += 1
        elif c in digits or (c == "." and i + 1 < n and s[i + 1] in digits):
            j = i
            while j < n and s[j] in digits:
                j += 1
            # thousands separators: `1,000`, `12,345,678` (a first group of 1-3 digits, then
            # groups of exactly three); `1,2` is not a number and fails to parse
            if 1 <= j - i <= 3:
                while s[j:j + 1] == "," and len(s[j + 1:j + 4]) == 3 \
                        and all(ch in digits for ch in s[j + 1:j + 4]) \
                        and (j + 4 == n or s[j + 4] not in digits):
                    j += 4
            if j < n and s[j] == ".":
                j += 1
                while j < n and s[j] in digits:
                    j += 1
            literal = s[i:j].replace(",", "")
            if len(literal) > MAX_NUMBER_DIGITS:
                raise _ParseError("number too long")
            tokens.append(Fraction(literal))
            i = j
        elif c == "*" and s[i:i + 2] == "**":
            tokens.append("^")
            i += 2
        elif c in "+-*/^(){}[]":
            tokens.append(c)
            i += 1
        elif c in _UNICODE_OPS:
            tokens.append(_UNICODE_OPS[c])
            i += 1
        elif c == "\\":
            j = i + 1
            while j < n and s[j].isascii() and s[j].isalpha():
                j += 1
            name = s[i + 1:j]
            if not name:                            # `\,` `\!` `\;` `\ ` spacing, `\{`
                if j < n and s[j] in ",!;: ":
                    i = j + 1
                    continue
                raise _ParseError("stray backslash")
            if name not in _LATEX_COMMANDS:
                raise _ParseError(f"unsupported command \\{name}")
            if _LATEX_COMMANDS[name] is not None:
                tokens.append(_LATEX_COMMANDS[name])
            i = j
        else:
            raise _ParseError(f"unexpected character {c!r}")
    return tokens


def _check_size(x):
    if isinstance(x, Fraction):
        if max(x.numerator.bit_length(), x.denominator.bit_length()) > MAX_FRACTION_BITS:
            raise _ParseError("number too large")
    elif not math.isfinite(x):
        raise _ParseError("not finite")
    return x


def _power(base, exponent):
    if isinstance(base, Fraction) and isinstance(exponent, Fraction) and exponent.denominator == 1:
        e = exponent.numerator
        if abs(e) > MAX_EXPONENT:
            raise _ParseError("exponent too large")
        bits = max(base.numerator.bit_length(), base.denominator.bit_length())
        if bits * abs(e) > MAX_FRACTION_BITS:
            raise _ParseError("power too large")
        if base == 0 and e < 0:
            raise _ParseError("division by zero")
        return base ** e
    b, e = float(base), float(exponent)
    if b < 0 and not e.is_integer():
        raise _ParseError("non-integer power of a negative number")
    if abs(e) > MAX_EXPONENT:
        raise _ParseError("exponent too large")
    return _check_size(math.pow(b, e))


def _root(x, n):
    if x < 0:
        raise _ParseError("root of a negative number")
    if isinstance(x, Fraction):             # exact when numerator and denominator are n-th powers
        num, den = round(x.numerator ** (1.0 / n)), round(x.denominator ** (1.0 / n))
        for a in (num - 1, num, num + 1):
            for b in (den - 1, den, den + 1):
                if a >= 0 and b > 0 and a ** n == x.numerator and b ** n == x.denominator:
                    return Fraction(a, b)
    return float(x) ** (1.0 / n)


class _ExprParser:
    """expr  := term (('+' | '-') term)*
    term  := unary (('*' | '/') unary | implicit-times atom)*     `2\\sqrt{2}`, `3(4)`, `2\\pi`
    unary := ('-' | '+') unary | power
    power := atom ('^' unary)?            right-associative, binds tighter than minus: -2^2 = -4
    atom  := number | '(' expr ')' | '{' expr '}' | frac atom atom | sqrt ('[' expr ']')? atom | pi
    """

    def __init__(self, tokens):
        self.tokens, self.pos, self.depth = tokens, 0, 0

    def peek(self):
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def take(self, expected=None):
        tok = self.peek()
        if tok is None or (expected is not None and tok != expected):
            raise _ParseError(f"expected {expected!r}, got {tok!r}")
        self.pos += 1
        return tok

    def parse(self):
        value = self.expr()
        if self.peek() is not None:
            raise _ParseError(f"trailing token {self.peek()!r}")
        return value

    def expr(self):
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise _ParseError("expression nested too deeply")
        value = self.term()
        while self.peek() in ("+", "-"):
            op, rhs = self.take(), self.term()
            value = _check_size(value + rhs if op == "+" else value - rhs)
        self.depth -= 1
        return value

    def term(self):
        value = self.unary()
        while True:
            tok = self.peek()
            if tok in ("*", "/"):
                self.take()
                rhs = self.unary()
                if tok == "/" and rhs == 0:
                    raise _ParseError("division by zero")
                value = _check_size(value * rhs if tok == "*" else value / rhs)
            elif tok in ("(", "{", "frac", "sqrt", "pi"):
                value = _check_size(value * self.power())
            else:
                return value

    def unary(self):
        if self.peek() in ("-", "+"):
            sign = self.take()
            self.depth += 1
            if self.depth > MAX_DEPTH:
                raise _ParseError("expression nested too deeply")
            value = self.unary()
            self.depth -= 1
            return -value if sign == "-" else value
        return self.power()

    def power(self):
        base = self.atom()
        if self.peek() == "^":
            self.take()
            return _power(base, self.unary())
        return base

    def atom(self):
        tok = self.take()
        if isinstance(tok, Fraction):
            return tok
        if tok in ("(", "{"):
            value = self.expr()
            self.take(")" if tok == "(" else "}")
            return value
        if tok == "frac":
            num, den = self.atom(), self.atom()
            if den == 0:
                raise _ParseError("division by zero")
            return _check_size(num / den)
        if tok == "sqrt":
            n = Fraction(2)
            if self.peek() == "[":
                self.take()
                n = self.expr()
                self.take("]")
                if not (isinstance(n, Fraction) and n.denominator == 1 and 2 <= n <= 16):
                    raise _ParseError("root index must be an integer in 2..16")
            return _check_size(_root(self.atom(), int(n)))
        if tok == "pi":
            return math.pi
        raise _ParseError(f"unexpected token {tok!r}")


def parse_number(text):
    """Value of a short arithmetic answer as a Fraction (exact) or float, or None if it is not one.

    Accepts integers, decimals, `1,000`, `3/4`, `\\frac{3}{4}` (`\\dfrac`), `2^3`, `\\sqrt{4}`,
    `-2.5`, `50\\%` (the percent sign is dropped: 50% reads as 50), `x = 5`, `$5$`, a trailing
    unit in `\\text{}`. Never raises; never uses Python's evaluator.
    """
    if not isinstance(text, str) or len(text) > MAX_EXPR_CHARS:
        return None
    s = text.strip().strip("$").strip()
    s = s.replace("\\(", "").replace("\\)", "").replace("\\[", "").replace("\\]", "")
    s = re.sub(r"(?<=[0-9}])\s*\\(?:text|mbox|mathrm)\{[A-Za-z ]*\}\s*$", "", s)    # units
    s = re.sub(r"\\(?:text|mathrm|mbox|textbf|mathbf)\{([^{}]*)\}", r"\1", s)
    s = re.sub(r"\^\s*\{?\\circ\}?|\u00b0|\\%|%", "", s)                    # degrees, percent
    s = re.sub(r"^[A-Za-z]\s*=\s*", "", s).strip().rstrip(".")              # `x = 5`
    if not s:
        return None
    try:
        return _ExprParser(_tokenize(s)).parse()
    except (ArithmeticError, ValueError, TypeError, RecursionError):
        return None


def _normalise_text_answer(s):
    s = re.sub(r"\\(?:text|mathrm|mbox|textbf|mathbf)\{([^{}]*)\}", r"\1", s)
    s = "".join(s.split()).strip("$.").casefold()
    if len(s) == 3 and s[0] == "(" and s[2] == ")":                          # `(B)` -> `b`
        s = s[1]
    return s


def answers_match(pred, truth, rel_tol=1e-6):
    """(matched?, how): exact (both Fractions), numeric (isclose) or string (normalised text)."""
    a, b = parse_number(pred), parse_number(truth)
    if a is not None and b is not None:
        if isinstance(a, Fraction) and isinstance(b, Fraction):
            return a == b, "exact"
        return math.isclose(float(a), float(b), rel_tol=rel_tol, abs_tol=1e-9), "numeric"
    if b is not None:                 # the truth is a number and the prediction is not
        return False, "unparsed"
    return _normalise_text_answer(pred) == _normalise_text_answer(truth), "string"


# -----------------------------------------------------------------------------
# 3. Reward functions: f(response, ground_truth, **meta) -> (reward in [0, 1], components)
# -----------------------------------------------------------------------------
# Components are for logging: numbers are averaged per task in the metrics, strings (the
# extracted answer, an error) are shown by --debug. Malformed model output scores 0; only a
# malformed *ground truth* raises (a ValueError naming it), which the router turns into 0 plus an
# `error` component.

def math_reward(response, ground_truth, /, **meta):
    """1 if the final answer (\\boxed{} or a fallback) equals the ground truth, exactly or
    numerically (section 2), or as normalised text when the truth is not a number."""
    answer, how = extract_final_answer(answer_part(response))
    if answer is None:
        return 0.0, {"correct": 0.0, "extracted": None}
    ok, match = answers_match(answer, str(ground_truth))
    return float(ok), {"correct": float(ok), "extracted": answer[:64], "extracted_by": how,
                       "match": match}


_NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
                 "ten", "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen",
                 "seventeen", "eighteen", "nineteen", "twenty"]
_COUNT_TOKEN = re.compile(r"(?<![0-9.])[0-9]{1,12}(?:\.[0-9]{1,6})?(?![0-9])|\b(?:"
                          + "|".join(_NUMBER_WORDS) + r")\b", re.IGNORECASE)


def parse_count(text):
    """The last integer or number word (zero..twenty) in text; None if absent or not an integer."""
    last = None
    for last in _COUNT_TOKEN.finditer(text):
        pass
    if last is None:
        return None
    token = last.group(0).lower()
    if token in _NUMBER_WORDS:
        return _NUMBER_WORDS.index(token)
    value = Fraction(token)
    return int(value) if value.denominator == 1 else None


def count_reward(response, ground_truth, /, **meta):
    """1 if the predicted count equals the ground truth. Reads \\boxed{} if present, else the
    last number (digits or a word up to twenty) of the answer."""
    truth = ground_truth if isinstance(ground_truth, int) else parse_count(str(ground_truth))
    if truth is None or isinstance(truth, bool):
        raise ValueError(f"count ground truth must be an integer, got {ground_truth!r}")
    text = answer_part(response)
    boxed = last_boxed(text)
    pred = parse_count(boxed if boxed is not None else text)
    ok = pred is not None and pred == truth
    return float(ok), {"correct": float(ok), "pred": pred}


_NUM = r"(-?[0-9]{1,9}(?:\.[0-9]{1,9})?)"
_BBOX_KEY = re.compile(r"[\"']?bbox_2d[\"']?\s*:\s*\[\s*" + r"\s*,\s*".join([_NUM] * 4) + r"\s*\]")
_BARE_BOX = re.compile(r"(?<![0-9.])" + r"\s*,\s*".join([_NUM] * 4) + r"(?![0-9.])")
_POINT_KEY = re.compile(r"[\"']?point_2d[\"']?\s*:\s*\[\s*" + _NUM + r"\s*,\s*" + _NUM + r"\s*\]")
_BARE_POINT = re.compile(r"[\[(]\s*" + _NUM + r"\s*,\s*" + _NUM + r"\s*[\])]")
MAX_PREDICTIONS = 32


def parse_boxes(text):
    """Boxes [x1, y1, x2, y2] (absolute pixels) predicted in text.

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


def giou(a, b):
    """Generalised IoU of boxes [x1, y1, x2, y2]: IoU - (area(C) - union) / area(C), C the
    smallest box enclosing both; in [-1, 1], and 1 only for identical boxes."""
    inter_w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    inter = inter_w * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    iou = inter / union if union > 0 else float(a == b)
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
    """
    truth = _truth_boxes(ground_truth)
    boxes = parse_boxes(answer_part(response))
    if not boxes:
        return 0.0, {"parsed": 0.0}
    scores = [[max(0.0, giou(p, t)) for p in boxes] for t in truth]
    reward = _greedy_match(scores, len(truth), len(boxes))
    return reward, {"parsed": 1.0, "n_boxes": float(len(boxes))}


def point_reward(response, ground_truth, /, **meta):
    """1 if the predicted point lies inside the ground-truth box (edges included). Several points
    or boxes are matched one-to-one, as for boxes."""
    truth = _truth_boxes(ground_truth)
    points = parse_points(answer_part(response))
    if not points:
        return 0.0, {"inside": 0.0, "parsed": 0.0}
    scores = [[float(t[0] <= x <= t[2] and t[1] <= y <= t[3]) for x, y in points] for t in truth]
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
    """1 if the answer equals the ground-truth text after normalise_ocr; edit similarity is a
    component only (the reward stays a match, as in the report)."""
    if not isinstance(ground_truth, str):
        raise ValueError(f"OCR ground truth must be a string, got {ground_truth!r}")
    text = answer_part(response)
    boxed = last_boxed(text)
    pred, truth = normalise_ocr(boxed if boxed is not None else text), normalise_ocr(ground_truth)
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
    """The last `[mm:ss,mm:ss]` (also `[12.5, 20]` seconds, `-`/`to` separators) -> (start, end)."""
    spans = _BRACKET_SPAN.findall(text) or _BARE_SPAN.findall(text)
    if not spans:
        return None
    a, b = parse_seconds(spans[-1][0]), parse_seconds(spans[-1][1])
    return min(a, b), max(a, b)


def temporal_iou(a, b):
    inter = max(0.0, min(a[1], b[1]) - max(a[0], b[0]))
    union = max(a[1], b[1]) - min(a[0], b[0])
    return inter / union if union > 0 else float(a == b)


def temporal_iou_reward(response, ground_truth, /, **meta):
    """Temporal IoU between the predicted and ground-truth spans; 0 when no span can be read."""
    if isinstance(ground_truth, str):
        truth = parse_span(ground_truth)
    elif isinstance(ground_truth, (list, tuple)) and len(ground_truth) == 2:
        truth = (min(map(float, ground_truth)), max(map(float, ground_truth)))
    else:
        truth = None
    if truth is None:
        raise ValueError(f"temporal ground truth must be '[mm:ss,mm:ss]' or [start_s, end_s], "
                         f"got {ground_truth!r}")
    span = parse_span(answer_part(response))
    if span is None:
        return 0.0, {"tiou": 0.0, "parsed": 0.0}
    iou = temporal_iou(span, truth)
    return iou, {"tiou": iou, "parsed": 1.0}


def choice_reward(response, ground_truth, /, **meta):
    """1 if the chosen option (the \\boxed{} content, else the first letter/number token of the
    answer: "2", "(B)", "Image 2" reads as its last token) equals the ground-truth option."""
    truth = str(ground_truth).strip().strip("()").casefold()
    if not truth or len(truth) > 16:
        raise ValueError(f"choice ground truth must be a short option such as 'B' or '2', "
                         f"got {ground_truth!r}")
    text = answer_part(response)
    boxed = last_boxed(text)
    if boxed is not None:
        text = boxed
    options = re.findall(r"[A-Za-z0-9]+", text[:64])
    # "Image 2" / "Option B": a leading word names the option; otherwise the first token decides
    pred = None
    if options:
        pred = options[1] if len(options) >= 2 and options[0].casefold() in (
            "image", "option", "answer", "choice") else options[0]
    ok = pred is not None and pred.casefold() == truth
    return float(ok), {"correct": float(ok), "pred": pred}


# The Bradley-Terry reward model lives in the training process (it is a model on the
# accelerator); train_rl registers a scoring function once it is loaded.
_reward_model = None


def register_reward_model(fn):
    """Route the "preference" task to fn(response, ground_truth, **meta) -> score in [0, 1] (a
    float, or (float, components)). Pass None to unregister."""
    global _reward_model
    _reward_model = fn


def preference_reward(response, ground_truth, /, **meta):
    """The reward model's score (e.g. sigmoid of the Bradley-Terry logit) of the whole response."""
    if _reward_model is None:
        raise ValueError("task 'preference' needs a reward model: call "
                         "register_reward_model(fn) first (train_rl.py --train-rm trains one)")
    out = _reward_model(response, ground_truth, **meta)
    score, components = out if isinstance(out, tuple) else (out, {})
    return float(score), {"rm_score": float(score), **components}


# -----------------------------------------------------------------------------
# 4. The reward router
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


# What counts as "passed" for the pass-rate metric: binary rewards must be 1; the clipped GIoU
# passes at 0.5, temporal IoU at 0.5, a reward-model score at 0.5.
PASS_AT = {"ground": 0.5, "video_ground": 0.5, "preference": 0.5}


def passed(tag, reward):
    return reward >= PASS_AT.get(tag, 1.0) - 1e-9


def register_reward(task, fn):
    """Add or replace the reward of a task tag. With a RewardPool, register before creating the
    pool: forked workers see the registry as it was when they started."""
    REWARDS[task] = fn


def compute_reward(task, response, ground_truth, /, **meta):
    """(reward in [0, 1], components) for one response; never raises.

    An unknown task, a non-string response, a reward function that raises (e.g. on a malformed
    ground truth) or returns NaN all give reward 0 with an `error` component naming the cause.
    """
    fn = REWARDS.get(task)
    if fn is None:
        return 0.0, {"error": f"unknown task {task!r}; known tasks: {sorted(REWARDS)}"}
    if not isinstance(response, str):
        return 0.0, {"error": f"response must be a string, got {type(response).__name__}"}
    try:
        reward, components = fn(response, ground_truth, **meta)
        reward = float(reward)
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
    register_reward before the pool starts are seen by the workers.
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
        items = list(items)
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

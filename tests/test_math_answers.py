"""The math reward on real-world answer formats: every case below is a (response, ground truth)
pair with a verdict judged by hand and the reason in one line. The rules the verdicts follow are
documented in rewards.py section 2 (extraction and refusals in front, Math-Verify behind).
Ground truths are written as datasets write them (a string, or an int)."""

import pytest

import rewards

def boxed(x):
    return "<think>\nworking...\n</think>\nThe answer is \\boxed{" + x + "}."


CASES = [
    # --- fractions ---------------------------------------------------------------------------
    (boxed(r"\frac12"), "1/2", 1, "\\frac12 is \\frac{1}{2} (braces optional for one digit)"),
    (boxed(r"\frac34"), "\\frac{3}{4}", 1, "\\frac34 is 3/4"),
    (boxed(r"\dfrac{3}{4}"), "0.75", 1, "dfrac renders the same fraction, 3/4 = 0.75"),
    (boxed(r"\tfrac{1}{3}"), "1/3", 1, "tfrac is a fraction too"),
    (boxed("3/4"), "\\frac{3}{4}", 1, "slash and \\frac are the same fraction"),
    (boxed("6/8"), "3/4", 1, "an unreduced fraction has the same value"),
    (boxed(r"\frac{-1}{2}"), "-0.5", 1, "sign inside the numerator"),
    (boxed(r"-\frac{1}{2}"), "-1/2", 1, "sign in front"),
    (boxed(r"\frac{1}{-2}"), "-1/2", 1, "sign in the denominator"),
    (boxed(r"\frac{\frac{1}{2}}{3}"), "1/6", 1, "nested fraction, braces balanced"),
    (boxed(r"\frac{2}{3}"), "3/2", 0, "inverted fraction is wrong"),
    (boxed(r"\frac{1}{0}"), "1", 0, "division by zero is no answer"),
    # --- decimals vs fractions (6 decimal places) -------------------------------------------
    (boxed("0.333333"), "1/3", 1, "agrees with 1/3 to 6 decimal places"),
    (boxed("0.33"), "1/3", 0, "two decimals is too coarse for 1/3"),
    (boxed("0.75"), "3/4", 1, "exact decimal of 3/4"),
    (boxed("0.7500001"), "3/4", 1, "equal after rounding to 6 decimals (Math-Verify's rule)"),
    (boxed("0.76"), "3/4", 0, "differs in the second decimal"),
    (boxed("1/3"), "0.333333", 1, "fraction against a 6-place decimal truth"),
    (boxed("1/3"), "0.333", 0, "a 3-place decimal truth is a different number"),
    (boxed("2.50"), "5/2", 1, "trailing zeros do not change the value"),
    (boxed(".5"), "1/2", 1, "leading dot decimal"),
    (boxed("3.0"), "3", 1, "3.0 is 3"),
    (boxed("3.1"), "3", 0, "3.1 is not 3"),
    (boxed("03"), "3", 1, "leading zero"),
    # --- mixed numbers ----------------------------------------------------------------------
    (boxed(r"2\frac{1}{2}"), "1", 0, "mixed number 2 1/2 is 5/2, not 2 * 1/2 = 1"),
    (boxed(r"2\frac{1}{2}"), "5/2", 1, "mixed number 2 1/2 = 5/2"),
    (boxed(r"2 \frac{1}{2}"), "2.5", 1, "mixed number with a space"),
    (boxed(r"1\tfrac34"), "7/4", 1, "mixed number with tfrac and no braces"),
    (boxed(r"3\frac{1}{3}"), "1", 0, "mixed number is not a product"),
    # --- thousands separators ---------------------------------------------------------------
    (boxed("1{,}000"), "1000", 1, "LaTeX thousands separator {,}"),
    (boxed("1,000"), "1000", 1, "comma thousands separator"),
    (boxed("12,345,678"), "12345678", 1, "several groups of three"),
    (boxed(r"1\,000"), "1000", 1, "thin-space thousands separator"),
    (boxed("1,2"), "12", 0, "1,2 is a list of two numbers, not twelve"),
    (boxed("1000"), "1,000", 1, "the truth may carry the separator"),
    (boxed(r"12\,345\,678"), "12345678", 1, "several thin-space separators"),
    (boxed(r"1\,0"), "10", 0, "a thin space before one digit is no thousands separator"),
    # --- units and currency -----------------------------------------------------------------
    (boxed("5 cm"), "5", 1, "trailing unit dropped"),
    (boxed(r"5\,\text{cm}^2"), "5", 1, "unit in \\text with a square"),
    (boxed(r"5 \text{ km/h}"), "5", 1, "compound unit in \\text"),
    (boxed("5 m^2"), "5", 1, "bare unit with a square"),
    (boxed(r"5\ \mathrm{kg}"), "5", 1, "unit in \\mathrm after a spacing command"),
    (boxed("12 dollars"), "12", 1, "currency word"),
    (boxed(r"\$5"), "5", 1, "escaped dollar sign"),
    (boxed(r"\$5.00"), "5", 1, "dollar amount with cents"),
    (boxed("6 cm"), "5", 0, "unit dropped, but 6 is not 5"),
    (boxed(r"90^\circ"), "90", 1, "degrees in LaTeX"),
    (boxed("90\u00b0"), "90", 1, "degree sign"),
    (boxed("45^{\\circ}"), "90", 0, "45 degrees is not 90"),
    # --- percent ----------------------------------------------------------------------------
    (boxed(r"50\%"), "50", 1, "percent against the percentage"),
    (boxed(r"50\%"), "0.5", 1, "percent against the ratio"),
    (boxed("0.3"), r"30\%", 1, "ratio against a percent truth"),
    (boxed("30"), r"30\%", 1, "percentage number against a percent truth"),
    (boxed(r"40\%"), "0.5", 0, "40% is not one half"),
    # --- algebraic expressions --------------------------------------------------------------
    (boxed("x^2+1"), "1+x^2", 1, "terms in another order"),
    (boxed("2x"), r"x \cdot 2", 1, "implicit and explicit product"),
    (boxed("2x"), "2", 0, "2x is not the number 2 (x is no unit)"),
    (boxed("x+y"), "y+x", 1, "commutative sum"),
    (boxed(r"\frac{x}{2}"), "x/2", 1, "fraction of a variable"),
    (boxed("(x+1)^2"), "x^2+2x+1", 1, "expanded form is equal"),
    (boxed("(x+1)^2"), "x^2+1", 0, "missing cross term"),
    (boxed("2(x+3)"), "2x+6", 1, "distributed product"),
    (boxed(r"\sqrt{8}"), r"2\sqrt{2}", 1, "simplified radical"),
    (boxed(r"2\sqrt{2}"), r"\sqrt{8}", 1, "radical the other way round"),
    (boxed(r"\sqrt{2}/2"), r"\frac{\sqrt{2}}{2}", 1, "same radical fraction"),
    (boxed(r"\frac{1}{\sqrt{2}}"), r"\frac{\sqrt{2}}{2}", 1, "rationalised denominator"),
    (boxed(r"\sqrt{3}"), r"\sqrt{2}", 0, "different radicals"),
    (boxed(r"\sqrt[3]{27}"), "3", 1, "cube root"),
    (boxed(r"\pi"), r"\pi", 1, "the constant pi"),
    (boxed(r"2\pi"), r"2\pi", 1, "a multiple of pi"),
    (boxed("3.14"), r"\pi", 0, "3.14 is an approximation, not pi to 6 places"),
    (boxed(r"\pi/2"), r"\frac{\pi}{2}", 1, "pi over two"),
    (boxed(r"\infty"), r"\infty", 1, "infinity"),
    (boxed("e^{2}"), "e^2", 1, "braced exponent"),
    # --- logs, powers and scientific notation -----------------------------------------------
    (boxed(r"\log_2 8"), "3", 1, "log base 2 of 8 is the value 3"),
    (boxed(r"\log_{10} 1000"), "3", 1, "log base 10"),
    (boxed(r"\log_2 8"), "4", 0, "log_2 8 is 3, not 4"),
    (boxed("2^3"), "8", 1, "a power is a value"),
    (boxed("2^{10}"), "1024", 1, "a braced power"),
    (boxed("2^{-1}"), "1/2", 1, "negative exponent"),
    (boxed(r"3 \times 10^5"), "300000", 1, "scientific notation is a value, not undone arithmetic"),
    (boxed(r"1.5 \times 10^{3}"), "1500", 1, "scientific notation with a decimal"),
    (boxed("10^{2000}"), "1", 0, "refused by the size bound before any algebra"),
    (boxed("9^{9^{9}}"), "1", 0, "a power tower is refused by the size bound"),
    (boxed("1" * 70), "1", 0, "a 70-digit number is refused by the size bound"),
    (boxed("10000!"), "1", 0, "a huge factorial is refused by the size bound"),
    # --- arithmetic left undone (the truth is a number) -------------------------------------
    (boxed("8+6"), "14", 0, "the sum is left undone: not a final answer"),
    (boxed("8 + 6 = 14"), "14", 1, "the value after the last = is the answer"),
    (boxed(r"2 \times 7"), "14", 0, "product left undone"),
    (boxed("3(4)"), "12", 0, "product left undone (Math-Verify would even read it as 7)"),
    (boxed("3(4)"), "7", 0, "3(4) is never 7"),
    (boxed(r"12 \div 4"), "3", 0, "quotient left undone"),
    (boxed("20-6"), "14", 0, "difference left undone"),
    (boxed("14"), "14", 1, "the evaluated value"),
    (boxed("-14"), "-14", 1, "a negative number is a value, not a subtraction"),
    (boxed("\u221214"), "-14", 1, "unicode minus sign"),
    # --- equations and variables ------------------------------------------------------------
    (boxed("x = 5"), "5", 1, "x = 5 states the value 5"),
    (boxed("5"), "x = 5", 1, "the value against an equation truth"),
    (boxed("y=3"), "x=3", 0, "a different variable is a different equation"),
    (boxed("x=3"), "x=3", 1, "the same equation"),
    (boxed(r"x = \pm 3"), r"\pm 3", 1, "plus-minus with or without x ="),
    (boxed("3, -3"), r"\pm 3", 1, "both roots listed"),
    (boxed(r"x=3 \text{ or } x=-3"), r"\pm 3", 1, "both roots joined by 'or' (the truth is a set)"),
    (boxed("3"), r"\pm 3", 0, "only one of the two roots"),
    (boxed("y = 2x + 1"), "y = 1 + 2x", 1, "the same line"),
    (boxed("y = 2x + 1"), "y = 2x - 1", 0, "a different line"),
    (boxed("k = 4"), "4", 1, "named variable with the value"),
    # --- sets, tuples and intervals ---------------------------------------------------------
    (boxed(r"\{2,1\}"), r"\{1,2\}", 1, "sets are unordered"),
    (boxed(r"\{1,2,3\}"), r"\{1,2\}", 0, "an extra element"),
    (boxed(r"\left(0,1\right]"), "(0,1]", 1, "\\left( \\right] are the same brackets"),
    (boxed("[0,1]"), "(0,1]", 0, "closed at 0 is a different interval"),
    (boxed("[0, 1)"), "[0,1)", 1, "half-open interval, spaces ignored"),
    (boxed(r"(-\infty, 2)"), r"(-\infty,2)", 1, "unbounded interval"),
    (boxed(r"x \in (0,1]"), "(0,1]", 1, "membership written out"),
    (boxed(r"(0,1) \cup (2,3)"), r"(0,1)\cup(2,3)", 1, "union of intervals"),
    (boxed("(1, 2)"), "(1,2)", 1, "the same pair or interval"),
    (boxed("(2,1)"), "(1,2)", 0, "an ordered pair in the other order"),
    (boxed("1, 2"), r"\{1,2\}", 1, "a list against a set truth"),
    # --- hedges and several answers ---------------------------------------------------------
    (boxed(r"11 \lor 12"), "11", 0, "logical-or hedge"),
    (boxed(r"11 \vee 12"), "12", 0, "vee hedge"),
    (boxed("3 or 4"), "3", 0, "word hedge"),
    (boxed(r"3 \text{ or } 4"), "4", 0, "hedge inside \\text"),
    (boxed("either 3 or 4"), "3", 0, "either/or hedge"),
    (boxed("3 and 4"), "3", 0, "two answers for one value"),
    ("\\boxed{3} or \\boxed{4}", "3", 0, "two different boxed answers"),
    ("\\boxed{4} so the answer is \\boxed{4}", "4", 1, "the same boxed answer twice is one answer"),
    ("\\boxed{3}\n\\boxed{5}", "5", 0, "two boxed answers hedge even if the last is right"),
    (boxed("3, 4"), "3", 0, "a list is not the single value"),
    (boxed("3-5"), "4", 0, "a range is not the value"),
    # --- where the answer is read -----------------------------------------------------------
    ("<think>\\boxed{4}</think> so \\boxed{5}", "4", 0, "only the text after </think> counts"),
    ("<think>\\boxed{5}</think> so \\boxed{4}", "4", 1, "the box after </think> counts"),
    ("<think>there are 3 red, no", "3", 0, "truncated while thinking: no answer"),
    ("<think>so it is \\boxed{4}", "4", 0, "a box inside an unclosed think is still thought"),
    ("\\boxed{4}", "4", 1, "no think block at all: the whole text is the answer"),
    ("<think>a</think>x</think> \\boxed{7}", "7", 1, "after the last </think>"),
    ("\\fbox{9}", "9", 1, "\\fbox is a box too"),
    ("\\boxed 5.", "5", 1, "\\boxed with a space-delimited token"),
    ("\\boxed{7} and then \\boxed{8", "7", 1, "a truncated last box is skipped"),
    ("Thus the final answer is 12.", "12", 1, "answer phrase fallback"),
    ("Answer: 2^3", "8", 1, "answer phrase with a colon"),
    ("The answer is $\\frac{3}{4}$.", "3/4", 1, "answer phrase with inline math"),
    ("The answer is \\(12\\).", "12", 1, "answer phrase with \\( \\) math"),
    ("42", "42", 1, "a bare short answer"),
    ("12 apples", "12", 1, "a bare answer with its noun"),
    ("I think it is 41 or 42 or 43 but it is long enough to not be a bare answer ok", "42", 0,
     "a long answer without a box or 'answer': nothing is read"),
    ("", "0", 0, "empty response"),
    ("\\boxed{}", "1", 0, "empty box"),
    ("\\boxed{", "1", 0, "unclosed box"),
    ("}}}{{{", "1", 0, "brace soup"),
    ("x" * 10000 + " \\boxed{42}", "42", 1, "a long response: the end is read"),
    ("\\boxed{42} " + "x" * 10000, "42", 0, "the box is outside the last 8192 characters read"),
    # --- letters, words and choices through the math reward ---------------------------------
    (boxed("(B)"), "B", 1, "option letter in parentheses"),
    (boxed(r"\text{B}"), "B", 1, "option letter in \\text"),
    (boxed("C"), "B", 0, "a different option"),
    (boxed("red circle"), "Red Circle", 1, "text answers compare as normalised text"),
    (boxed("blue circle"), "Red Circle", 0, "different text"),
    (boxed("three"), "3", 0, "a number word is not the math answer (counts read words)"),
    (boxed("Yes"), "yes", 1, "case is ignored in text answers"),
    # --- unicode and other scripts ----------------------------------------------------------
    ("\u7b54\u6848\u662f \\boxed{\u22123}", "-3", 1, "Chinese text around a unicode minus"),
    (boxed("\u0663"), "3", 0, "an Arabic-Indic digit is not read as 3"),
    (boxed("\uff13"), "3", 0, "a fullwidth digit is not read as 3"),
    # --- integer ground truths as datasets store them ----------------------------------------
    (boxed("1,000"), 1000, 1, "int ground truth, separator in the answer"),
    (boxed("5"), 4, 0, "int ground truth, wrong answer"),
    (boxed("-2.5"), "-5/2", 1, "negative decimal against a negative fraction"),
    (boxed(r"\frac{6}{4}"), "1.5", 1, "unreduced fraction against a decimal"),
    (boxed("0.5"), r"\frac{1}{2}", 1, "decimal against a fraction truth"),
    (boxed("1.5"), r"\frac{3}{2}", 1, "decimal against an improper fraction"),
    (boxed("7"), "7", 1, "the plain case"),
    (boxed("17"), "7", 0, "a different integer containing the truth's digit"),
    (boxed("7."), "7", 1, "a sentence-final dot is not a decimal point"),
]


def test_corpus_is_large_and_explained():
    assert len(CASES) >= 150
    assert all(len(c) == 4 and c[2] in (0, 1) and c[3] for c in CASES)


@pytest.mark.parametrize("response, truth, verdict, why", CASES,
                         ids=[f"{i}" for i in range(len(CASES))])
def test_math_reward_on_real_world_formats(response, truth, verdict, why):
    reward, components = rewards.math_reward(response, truth)
    assert reward == verdict, (why, components)

"""Best-of-N math: few-shot prompts, answer extraction and equivalence (paper §4.2, App. C.4).

The checkers follow the two conventions the MATH literature uses, so our pass@k numbers mean
what readers expect:

- Hendrycks et al. (2021), ``is_equiv``: both answers go through ``_strip_string`` (drop
  ``\\left``/``\\right``, ``\\!``, degrees, ``\\$``, percent signs and units written
  ``\\text{ unit}`` on the right; ``dfrac``/``tfrac`` -> ``frac``; ``\\frac12`` ->
  ``\\frac{1}{2}``, ``\\sqrt3`` -> ``\\sqrt{3}``; ``.5`` -> ``0.5``; "x = 5" -> "5";
  ``a/b`` -> ``\\frac{a}{b}``; spaces removed), then the strings are compared.
- Lewkowycz et al. (2022, Minerva, App. D), ``normalize_final_answer``: unit words after a
  number ("5 cm", "12 dollars", ``5\\text{cm}``), ``\\text{and}`` as a list separator,
  ``{,}`` and ``,\\!`` thousands separators, ``\\text{...}``/``\\textbf{...}`` unwrapped.

Where the two disagree with themselves we fix the rule, not the string: a unit is removed only
at the END of an answer and only if it is a unit (Hendrycks cut everything after the first
``\\text{ ``, so "2 \\text{ or } 5" read as "2"; a naive regex read it as "25"); ``\\text{ or }``
and ``\\text{ and }`` separate list items; ``\\rightarrow`` survives ``\\right``. Unicode forms
(minus sign, degree sign, pi, thin spaces) are mapped to their LaTeX first. Finally, two answers
whose canonical strings are plain numbers, fractions or mixed numbers (``1\\frac{4}{5}``, a form
MATH-500's gold answers use) are compared as exact rationals, so "0.25" equals ``\\frac14``;
a rounded decimal ("0.333") is not 1/3. There is no computer algebra: "2x+1" and "1+2x" differ,
as in both reference checkers' string modes.

GSM8K: a completion is cut at the next few-shot question, then read in this order: the number
after the first "####", else after the last "The answer is", else the last number in the text.
An answer clause that states an equation ("3 hours and 20 minutes = 200 minutes") answers with
the number after its last "=". Numbers compare exactly after dropping "$", thousands separators
and trailing zeros; a Unicode minus is a minus.
"""

import re
from fractions import Fraction

# ---------------------------------------------------------------------------------------------
# Few-shot prompts, verbatim from Appendix C.4. The paper's text shows the worked answers with
# inline LaTeX ("$21 - 15 = 6$"); we keep them as printed. Placeholders use str.format names.
# ---------------------------------------------------------------------------------------------
GSM8K_FEW_SHOT = (
    "As an expert problem solver solve step by step the following mathematical questions. "
    "Place your answer after the \u201c####\u201d symbol.\n\n"
    "Q: There are 15 trees in the grove. Grove workers will plant trees in the grove today. "
    "After they are done, there will be 21 trees. How many trees did the grove workers plant today?\n\n"
    "A: We start with 15 trees. Later we have 21 trees. The difference must be the number of trees "
    "they planted. So, they must have planted $21 - 15 = 6$ trees. The answer is 6. #### 6\n\n"
    "Q: If there are 3 cars in the parking lot and 2 more cars arrive, how many cars are in the "
    "parking lot?\n\n"
    "A: There are 3 cars in the parking lot already. 2 more arrive. Now there are $3 + 2 = 5$ cars. "
    "The answer is 5. #### 5\n\n"
    "Q: {question}\n\n"
    "A:"
)

MATH_FEW_SHOT = (
    "Given a mathematics problem, determine the answer. Simplify your answer as much as possible. "
    "Output your answer in the format Answer: $\\boxed{{\\text{{answer}}}}$\n\n"
    "Problem: Let $f(x)=x^3+3$ and $g(x) = 2x^2 + 2x + 1$. What is $g(f(-2))$?\n\n"
    "Answer: We note that $f(-2)=(-2)^3+3=-5$, so $g(f(-2))=g(-5)=2 \\cdot (-5)^2+2 \\cdot (-5)+1=41$ "
    "So, $\\boxed{{41}}$\n\n"
    "###\n\n"
    "Problem: What is the greatest possible value of $x+y$ such that $x^2 + y^2 =90$ and $xy=27$?\n\n"
    "Answer: We have $(x+y)^2=x^2+y^2+2xy=90+2 \\cdot 27=144$, so $x+y=12$ or $x+y=-12$. We want the "
    "larger value $x+y=\\boxed{{12}}$\n\n"
    "###\n\n"
    "Problem: {problem}"
)

# Where a sampled completion stops answering *our* question: few-shot models go on to invent the
# next "Q:"/"Problem:". Samplers can pass these as stop strings; the extractors cut at them too.
GSM8K_STOP = ("\n\nQ:", "\nQ:")
MATH_STOP = ("\n###", "\n\nProblem:")


def build_gsm8k_prompt(question: str) -> str:
    """The App. C.4 GSM8K prompt for one question; it already ends with the "A:" cue."""
    return GSM8K_FEW_SHOT.format(question=question.strip())


def build_math_prompt(problem: str, answer_cue: bool = True) -> str:
    """The App. C.4 MATH prompt for one problem.

    The paper's template ends at "Problem: {problem}". With ``answer_cue`` we append
    "\\n\\nAnswer:", the line that precedes every worked solution in the shots, so a base model
    starts solving instead of possibly continuing the problem statement.
    """
    prompt = MATH_FEW_SHOT.format(problem=problem.strip())
    return prompt + "\n\nAnswer:" if answer_cue else prompt


def truncate_at_stop(text: str, stops: tuple[str, ...]) -> str:
    """Cut ``text`` at the earliest of the stop strings (unchanged if none occurs)."""
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=len(text))
    return text[:cut]



# Unicode that models (and people) write for LaTeX: mapped before any other rule.
_UNICODE = {"\u2212": "-", "\ufe63": "-", "\uff0d": "-", "\u00b0": "^\\circ", "\u03c0": "\\pi",
            "\u221e": "\\infty", "\u221a": "\\sqrt", "\u00d7": "\\times", "\u22c5": "\\cdot",
            "\u2264": "\\le", "\u2265": "\\ge", "\u2260": "\\ne", "\u00b1": "\\pm",
            "\u00a0": " ", "\u2009": " ", "\u202f": " ", "\u2007": " "}
_UNICODE_RE = re.compile("|".join(map(re.escape, _UNICODE)))


def _from_unicode(text: str) -> str:
    return _UNICODE_RE.sub(lambda m: _UNICODE[m.group()], text)


# ---------------------------------------------------------------------------------------------
# GSM8K
# ---------------------------------------------------------------------------------------------
# A number as written in GSM8K text: optional sign and "$", thousands groups or plain digits,
# optional decimals. Thousands groups come first so "1,600" is one number, not "1" and "600".
_NUMBER_RE = re.compile(r"-?\$?\s?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|-?\$?\.\d+")
_ANSWER_IS_RE = re.compile(r"the (?:final )?answer is", re.IGNORECASE)
_CLAUSE_END_RE = re.compile(r"\n|\.(?:\s|$)")  # a line break, or a period that ends a sentence


def normalize_number(text: str) -> str | None:
    """Canonical string of a written number ("$1,600.50" -> "1600.5", "-0.0" -> "0"), else None."""
    value = parse_number(text)
    if value is None:
        return None
    # An exact decimal back to text: integers without ".0", others via float's shortest repr
    # (GSM8K values have few digits, so this round-trips).
    return str(value.numerator) if value.denominator == 1 else repr(float(value))


def parse_number(text: str) -> Fraction | None:
    """Exact value of a number written with optional "$", commas, sign and decimals."""
    cleaned = _from_unicode(text).strip().replace("$", "").replace(",", "").replace(" ", "")
    cleaned = cleaned.rstrip(".")  # a sentence-final period, as in "is 18."
    if not re.fullmatch(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)", cleaned):
        return None
    # Fraction parses decimal strings exactly, so 0.1 + 0.2 style float error cannot creep in.
    return Fraction(cleaned)


def gsm8k_gold_answer(solution: str) -> str:
    """The gold answer of a GSM8K reference solution: the number after its final "####"."""
    if "####" not in solution:
        raise ValueError(f"GSM8K solution has no '####' answer line: {solution[-80:]!r}")
    answer = normalize_number(solution.rsplit("####", 1)[1])
    if answer is None:
        raise ValueError(f"GSM8K gold answer is not a number: {solution.rsplit('####', 1)[1]!r}")
    return answer


def _clause_answer(text: str) -> str | None:
    """The number an answer clause states: after its last "=" if it has one, else its first.

    The clause runs to the end of the line or sentence, so "#### 3 hours and 20 minutes = 200
    minutes" answers 200 while "The answer is 18. Then 3 more" answers 18.
    """
    end = _CLAUSE_END_RE.search(text)
    clause = text[:end.start()] if end else text
    if "=" in clause:
        match = _NUMBER_RE.search(clause.rsplit("=", 1)[1])
        if match:
            return normalize_number(match.group())
    match = _NUMBER_RE.search(clause) or _NUMBER_RE.search(text)  # a number on the next line
    return normalize_number(match.group()) if match else None


def extract_gsm8k_answer(completion: str) -> str | None:
    """Read a model's GSM8K answer (see the module docstring for the order of rules)."""
    text = _from_unicode(truncate_at_stop(completion, GSM8K_STOP))
    if "####" in text:
        # The first "####" answers our question; anything after it is the model rambling on.
        return _clause_answer(text.split("####", 1)[1])
    marks = list(_ANSWER_IS_RE.finditer(text))
    if marks:
        answer = _clause_answer(text[marks[-1].end():])
        if answer is not None:
            return answer
    numbers = _NUMBER_RE.findall(text)
    return normalize_number(numbers[-1]) if numbers else None


def gsm8k_is_correct(completion: str, gold: str) -> bool:
    """Whether a completion's extracted answer equals the gold answer (exact numeric value)."""
    predicted = extract_gsm8k_answer(completion)
    if predicted is None:
        return False
    return parse_number(predicted) == parse_number(gold)


# ---------------------------------------------------------------------------------------------
# MATH
# ---------------------------------------------------------------------------------------------
def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}``/``\\fbox{...}`` in ``text``, braces balanced.

    Also reads the brace-less form ``\\boxed 5`` (up to the next "$" or whitespace), which some
    MATH solutions use. Returns None when there is no box or its braces never close.
    """
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    rest = text[start + (6 if text.startswith("\\boxed", start) else 5):]
    if rest.startswith(" "):
        return re.split(r"[\s$]", rest.lstrip(), maxsplit=1)[0] or None
    if not rest.startswith("{"):
        return None
    end = _group_end(rest, 0)
    return rest[1:end - 1] if end else None


def extract_math_answer(completion: str) -> str | None:
    """A model's MATH answer: the last box before the next few-shot "###"/"Problem:"."""
    return last_boxed(truncate_at_stop(completion, MATH_STOP))


def _group_end(s: str, i: int) -> int | None:
    """Index just past the brace group that opens at ``s[i] == "{"`` (None if it never closes)."""
    depth = 0
    for j in range(i, len(s)):
        depth += (s[j] == "{") - (s[j] == "}")
        if depth == 0:
            return j + 1
    return None


def _argument(s: str, i: int) -> tuple[str, int] | None:
    """One TeX macro argument starting at ``s[i]``: a brace group, a command, or one character.

    Returns (argument with braces, index past it); this is how TeX reads ``\\frac\\pi2`` as
    ``\\frac{\\pi}{2}`` and ``\\frac12`` as ``\\frac{1}{2}``.
    """
    if i >= len(s):
        return None
    if s[i] == "{":
        end = _group_end(s, i)
        return (s[i:end], end) if end else None
    if s[i] == "\\":
        match = re.match(r"\\[A-Za-z]+", s[i:])
        if match:
            return "{" + match.group() + "}", i + match.end()
    return "{" + s[i] + "}", i + 1


def _brace_arguments(s: str, command: str, count: int) -> str:
    """Rewrite every ``command`` so its ``count`` arguments are brace groups (spaces removed)."""
    out, i = [], 0
    while (j := s.find(command, i)) >= 0:
        k = j + len(command)
        if k < len(s) and s[k].isalpha():  # \fracture is not \frac
            out.append(s[i:k])
            i = k
            continue
        args, pos = [], k
        if s.startswith("[", pos) and "]" in s[pos:]:  # \sqrt[3]{x}: keep the optional argument
            pos = s.index("]", pos) + 1
            args.append(s[k:pos])
        for _ in range(count):
            arg = _argument(s, pos)
            if arg is None:
                break
            args.append(arg[0])
            pos = arg[1]
        if len(args) < count + (s[k:k + 1] == "["):
            out.append(s[i:])
            return "".join(out)
        out.append(s[i:j] + command + "".join(args))
        i = pos
    return "".join(out) + s[i:]


# Words that name a unit (or a counted thing) after a number: Minerva's removed expressions
# plus their singulars and a few common ones. Removed only at the end, after a number or brace.
_UNITS = ("square units|square feet|square inches|square meters|square centimeters|units?|"
          "sq|square|ways|integers|dollars?|cents?|mph|inches|inch|ft|feet|foot|hours?|km|"
          "kilometers?|miles?|meters?|metres?|cm|mm|m|gm|g|kg|grams?|pounds?|lbs?|points?|"
          "minutes?|seconds?|days?|weeks?|years?|digits?|degrees?|meals|edges|students|"
          "multiples|people|percent|calories")
_RIGHT_UNIT_RE = re.compile(
    r"(?<=[\d}.)])\s*(?:\\(?:text|mbox|mathrm|textrm)\{\s*(?:" + _UNITS + r")\s*\}|(?:" + _UNITS + r")\b)"
    r"(?:\^\{?[23]\}?)?$")
# Hendrycks' right units: "\text{ words}" (a space after the brace) ending the answer.
_SPACED_TEXT_TAIL_RE = re.compile(r"\\(?:text|mbox|textrm)\{ [^{}]*\}(?:\^\{?[23]\}?)?$")
# Connectives written as text separate list items: "2 \text{ or } 5", "3 \text{and} 4".
_CONNECTIVE_RE = re.compile(r",?\s*\\(?:text|mbox|textrm)\{\s*(?:and|or|,)\s*\}\s*")
_TEXT_WRAPPER_RE = re.compile(r"\\(?:text|textbf|textit|textrm|textnormal|mbox|mathrm|mathbf|boxed)"
                              r"\{([^{}]*)\}")


def normalize_math_answer(answer: str) -> str:
    """Canonical string of a MATH answer (see the module docstring for the conventions).

    Two answers are equal when their canonical strings match, or when both are numbers of equal
    exact value (``math_equiv``).
    """
    s = _from_unicode(answer).replace("\n", " ").strip()
    s = s.replace("\\displaystyle", "")
    # Spacing commands carry no value: "11,\! 111" and "1\,000" are one number. The lookbehind
    # keeps a matrix row break (two backslashes, then a space) intact.
    s = re.sub(r"(?<!\\)\\[!,;: ]", "", s).replace("~", "")
    s = s.replace("{,}", "")  # 1{,}000
    s = s.replace("\\\\", "\\")  # Hendrycks: a row break and a backslash normalize alike
    s = s.replace("tfrac", "frac").replace("dfrac", "frac")
    s = re.sub(r"\\(?:left|right|big|Big|bigg|Bigg)(?![A-Za-z])", "", s)  # not \rightarrow
    s = re.sub(r"\\(?:leq|leqslant)(?![A-Za-z])", r"\\le", s)
    s = re.sub(r"\\(?:geq|geqslant)(?![A-Za-z])", r"\\ge", s)
    s = re.sub(r"\\neq(?![A-Za-z])", r"\\ne", s)
    # Degrees: "30^\circ", "30^{\circ}", "30°" and "30 degrees" are 30.
    s = re.sub(r"\^\s*\{\s*\\circ\s*\}|\^\s*\\circ|\\degree", "", s)
    s = s.replace("\\$", "").replace("$", "")
    s = _CONNECTIVE_RE.sub(",", s)
    s = _SPACED_TEXT_TAIL_RE.sub("", s).strip()
    s = _RIGHT_UNIT_RE.sub("", s).strip()
    previous = None
    while previous != s:  # unwrap nested wrappers from the inside out
        previous, s = s, _TEXT_WRAPPER_RE.sub(r"\1", s)
    s = s.replace("\\%", "").replace("%", "")
    s = s.strip().rstrip(".").strip()
    # ".5" and "{.5" read as "0.5".
    s = re.sub(r"(^|[\s{(\[,=-])\.(\d)", r"\g<1>0.\2", s)
    # "x = 5" or "k=5" -> "5": a short variable name before a single "=" (Hendrycks).
    if s.count("=") == 1 and len(s.split("=")[0].strip()) <= 2:
        s = s.split("=")[1]
    s = s.replace(" ", "")
    s = _brace_arguments(s, "\\sqrt", 1)
    s = _brace_arguments(s, "\\frac", 2)
    # A multiple-choice answer: "(C)" and "C" are the same answer.
    s = re.sub(r"^\(([A-E])\)$", r"\1", s)
    # Thousands separators, only when the whole answer is one number ("11,111,111,100"): a comma
    # elsewhere separates tuple entries and must stay.
    if re.fullmatch(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?", s):
        s = s.replace(",", "")
    match = re.fullmatch(r"(-?\d+)/(\d+)", s)  # "3/4" -> \frac{3}{4} (Hendrycks' a/b rule)
    return f"\\frac{{{match.group(1)}}}{{{match.group(2)}}}" if match else s


def _math_number(s: str) -> Fraction | None:
    """Exact value of a canonical answer that is a number, a fraction or a mixed number."""
    if re.fullmatch(r"[-+]?(?:\d+\.?\d*|\.\d+)", s):
        return Fraction(s)
    match = re.fullmatch(r"([-+]?)(\d+)?\\frac\{([-+]?\d+)\}\{([-+]?\d+)\}", s)
    if not match or int(match.group(4)) == 0:
        return None
    sign, whole, num, den = match.groups()
    value = Fraction(int(num), int(den))
    if whole is not None:
        if not 0 <= value < 1:
            return None  # "2\frac{5}{3}" is not how anyone writes a mixed number
        value += int(whole)  # MATH writes mixed numbers: 1\frac{4}{5} = 9/5
    return -value if sign == "-" else value


def math_equiv(predicted: str | None, gold: str) -> bool:
    """Whether two MATH answers are equal after normalization (or as exact numbers)."""
    if predicted is None:
        return False
    a, b = normalize_math_answer(predicted), normalize_math_answer(gold)
    if a == b:
        return True
    # "0.25" vs "\frac{1}{4}", "5.0" vs "5": equal exact values. Decimals are exact here, so a
    # rounded "0.333" is *not* 1/3, as a grader of "simplify your answer" prompts should say.
    value_a, value_b = _math_number(a), _math_number(b)
    return value_a is not None and value_a == value_b


def math_is_correct(completion: str, gold: str) -> bool:
    """Whether a completion's last boxed answer is equivalent to the gold answer."""
    return math_equiv(extract_math_answer(completion), gold)

"""Best-of-N math: few-shot prompts, answer extraction and equivalence (paper §4.2, App. C.4).

GSM8K: the paper's few-shot prompt asks for the answer after "####", like the gold solutions.
A completion is cut at the start of the next few-shot question, then read in this order: the
number after the first "####", else the number after the last "The answer is", else the last
number in the text. Numbers are compared exactly (as fractions) after dropping "$", thousands
separators and trailing zeros, so "1,600.00" equals "1600".

MATH: the answer is the content of the last ``\\boxed{...}`` (or ``\\fbox{...}``) with balanced
braces, normalized with the rules of Hendrycks et al.'s ``is_equiv`` (their ``_strip_string``:
``\\left``/``\\right``, ``\\!``, ``dfrac``/``tfrac``, ``\\frac12``, ``\\sqrt3``, units in
``\\text{ ...}``, degrees, percent, "x =" prefixes, ``0.5``, ``a/b``), plus a few more (unwrapping
``\\text{...}``, thousands separators, trailing periods) and exact numeric comparison. No
computer algebra: "2x+1" and "1+2x" are different answers here, as in Hendrycks' checker.
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


# ---------------------------------------------------------------------------------------------
# GSM8K
# ---------------------------------------------------------------------------------------------
# A number as written in GSM8K text: optional sign and "$", thousands groups or plain digits,
# optional decimals. Thousands groups come first so "1,600" is one number, not "1" and "600".
_NUMBER_RE = re.compile(r"-?\$?\s?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|-?\$?\.\d+")
_ANSWER_IS_RE = re.compile(r"the (?:final )?answer is", re.IGNORECASE)


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
    cleaned = text.strip().replace("$", "").replace(",", "").replace(" ", "")
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


def extract_gsm8k_answer(completion: str) -> str | None:
    """Read a model's GSM8K answer (see the module docstring for the order of rules)."""
    text = truncate_at_stop(completion, GSM8K_STOP)
    if "####" in text:
        # The first "####" answers our question; anything after it is the model rambling on.
        match = _NUMBER_RE.search(text.split("####", 1)[1])
        return normalize_number(match.group()) if match else None
    marks = list(_ANSWER_IS_RE.finditer(text))
    if marks:
        match = _NUMBER_RE.search(text, marks[-1].end())
        if match:
            return normalize_number(match.group())
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
    depth = 0
    for i, ch in enumerate(rest):
        depth += (ch == "{") - (ch == "}")
        if depth == 0:
            return rest[1:i]
    return None


def extract_math_answer(completion: str) -> str | None:
    """A model's MATH answer: the last box before the next few-shot "###"/"Problem:"."""
    return last_boxed(truncate_at_stop(completion, MATH_STOP))


def _fix_fracs(s: str) -> str:
    r"""``\frac12`` -> ``\frac{1}{2}``, ``\frac1{72}`` -> ``\frac{1}{72}`` (Hendrycks' rule)."""
    head, *parts = s.split("\\frac")
    out = head
    for part in parts:
        out += "\\frac"
        if part.startswith("{") or len(part) < 2:
            out += part
        elif part[1] == "{":
            # One bare numerator digit, braced denominator.
            out += "{" + part[0] + "}" + part[1:]
        else:
            out += "{" + part[0] + "}{" + part[1] + "}" + part[2:]
    # The mirror case Hendrycks missed: a braced numerator and one bare digit, "\frac{1}2".
    return re.sub(r"\\frac\{([^{}]*)\}(\w)", r"\\frac{\1}{\2}", out)


def _fix_sqrt(s: str) -> str:
    r"""``\sqrt3`` -> ``\sqrt{3}`` (one bare character, as in Hendrycks' rule)."""
    return re.sub(r"\\sqrt(?![{\[])(\w)", r"\\sqrt{\1}", s)


def _fix_a_slash_b(s: str) -> str:
    """"3/4" -> "\\frac{3}{4}" when the whole answer is integer/integer."""
    match = re.fullmatch(r"(-?\d+)/(\d+)", s)
    return f"\\frac{{{match.group(1)}}}{{{match.group(2)}}}" if match else s


def _unwrap_text(s: str) -> str:
    r"""``\text{(C)}`` -> ``(C)``: text wrappers carry no mathematical content."""
    previous = None
    while previous != s:
        previous = s
        s = re.sub(r"\\(?:text|textbf|mbox|mathrm|textnormal)\{([^{}]*)\}", r"\1", s)
    return s


def normalize_math_answer(answer: str) -> str:
    """Canonical string of a MATH answer (Hendrycks et al.'s ``_strip_string`` plus extras).

    Two answers are treated as equal when their canonical strings match, or when both are plain
    numbers or fractions of equal value (see ``math_equiv``).
    """
    s = answer.strip().replace("\n", "")
    # Spacing commands and inverse spaces carry no value: "11,\! 111" is one number. The
    # lookbehind keeps a matrix row break (two backslashes, then a space) intact.
    s = re.sub(r"(?<!\\)\\[!,;: ]", "", s).replace("~", "")
    s = s.replace("\\\\", "\\")  # Hendrycks: a row break and a backslash normalize alike
    s = s.replace("tfrac", "frac").replace("dfrac", "frac")
    s = s.replace("\\left", "").replace("\\right", "")
    # Degrees: "30^\circ" and "30^{\circ}" are 30.
    s = s.replace("^{\\circ}", "").replace("^\\circ", "")
    s = s.replace("\\$", "").replace("$", "")
    # Units on the right are written "\text{ cents}" / "\mbox{ inches}^2" (a leading space inside
    # the braces, Hendrycks' observation); drop them with any power after them.
    s = re.sub(r"\\(?:text|mbox|textrm|mathrm)\{\s[^{}]*\}(?:\^\{?\d\}?)?", "", s)
    s = _unwrap_text(s)
    s = s.replace("\\%", "").replace("%", "")
    # ".5" and "{.5" read as "0.5".
    s = s.replace(" .", " 0.").replace("{.", "{0.")
    s = s.strip().rstrip(".").strip()
    if s.startswith("."):
        s = "0" + s
    # "x = 5" or "k=5" -> "5": a short variable name before a single "=".
    if s.count("=") == 1 and len(s.split("=")[0].strip()) <= 2:
        s = s.split("=")[1]
    # Spaces go before the sqrt/frac fixes so "\sqrt 3" and "\frac 1 2" are caught too.
    s = s.replace(" ", "")
    s = _fix_sqrt(s)
    s = _fix_fracs(s)
    # Thousands separators, only when the whole answer is one number ("11,111,111,100"): a comma
    # elsewhere separates tuple entries and must stay.
    if re.fullmatch(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?", s):
        s = s.replace(",", "")
    if s == "0.5":
        s = "\\frac{1}{2}"
    return _fix_a_slash_b(s)


def _math_number(s: str) -> Fraction | None:
    """Exact value of a canonical answer that is a number or a simple (signed) fraction."""
    number = parse_number(s) if re.fullmatch(r"-?\d*\.?\d+", s) else None
    if number is not None:
        return number
    match = re.fullmatch(r"(-?)\\frac\{(-?\d+)\}\{(-?\d+)\}", s)
    if match and int(match.group(3)) != 0:
        value = Fraction(int(match.group(2)), int(match.group(3)))
        return -value if match.group(1) else value
    return None


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

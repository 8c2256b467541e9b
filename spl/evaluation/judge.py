"""LLM-judge diversity metrics over pools of responses (paper §4.1, App. B.1).

The paper shows a judge model (gpt-4o-mini) small pools of one prompt's 16 responses and asks
for a 1-5 rating of their logical agreement, content diversity, surface-form diversity or
perspective diversity. The prompts below are App. B.1's, verbatim. Logical agreement becomes
"logical disagreement" as 5 - rating, as the paper does, so that for every metric higher means
more diverse.

The client speaks the OpenAI-compatible ``POST {base_url}/chat/completions`` API with only the
standard library (urllib), so any such endpoint works: OpenAI, vLLM, llama.cpp's server. The
API key comes from an environment variable whose name is a setting; it is sent in the
Authorization header and never printed, logged or put in an error message.
"""

import json
import math
import os
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

# ---------------------------------------------------------------------------------------------
# Prompts (App. B.1, verbatim). {input} is the user prompt; {response_list} the pooled responses.
# ---------------------------------------------------------------------------------------------
_RATING_TAIL = (
    "Output your response as Rating: X, where X is your rating. Afterwards, on the next line, "
    "please provide a brief explanation of your rating."
)
JUDGE_PROMPTS: dict[str, str] = {
    "logical_agreement": (
        "You will be presented with 2 responses to the same prompt. Your task is to analyze their "
        "logical agreement on a scale of 1-5, where 1 means completely divergent approaches or ideas "
        "and 5 means nearly identical logical frameworks or conclusions.\n\n"
        "Prompt: {input}\n\nResponses: {response_list}\n\n"
        "Please provide a numerical rating (1-5) of their logical agreement. " + _RATING_TAIL
    ),
    "content": (
        "You will be presented with 4 responses to the same prompt. Your task is to analyze their "
        "content diversity on a scale of 1-5, where 1 means nearly identical content or conclusions "
        "and 5 means completely divergent content or ideas.\n\n"
        "Prompt: {input}\n\nResponses: {response_list}\n\n"
        "How diverse are the contents of the proposed responses? Please provide a numerical rating "
        "(1-5). " + _RATING_TAIL
    ),
    "surface_form": (
        "You will be presented with 4 responses to the same prompt. Your task is to analyze their "
        "surface form diversity on a scale of 1-5, where 1 means nearly identical textual "
        "organization or structure, and 5 means completely varied textual arrangements or styles.\n\n"
        "Prompt: {input}\n\nResponses: {response_list}\n\n"
        "How diverse are the surface forms of the proposed responses? Please provide a numerical "
        "rating (1-5). " + _RATING_TAIL
    ),
    "perspective": (
        "You will be presented with 4 responses to the same prompt. Your task is to analyze their "
        "perspective diversity on a scale of 1-5, where 1 means nearly identical viewpoints or "
        "approaches and 5 means completely varied perspectives or approaches to the topic.\n\n"
        "Prompt: {input}\n\nResponses: {response_list}\n\n"
        "How diverse are the perspectives of the proposed responses? Please provide a numerical "
        "rating (1-5). " + _RATING_TAIL
    ),
}
# Pool size per metric: the number each prompt tells the judge it will see. §4.1 says "pools of
# 4", but the logical-agreement prompt says 2 responses; showing 4 while saying 2 would make
# the rating ill-posed, so we follow each prompt's own count.
POOL_SIZES: dict[str, int] = {"logical_agreement": 2, "content": 4, "surface_form": 4, "perspective": 4}
# The reported names: the paper reports 5 - (logical agreement) as "logical disagreement".
REPORTED_NAMES: dict[str, str] = {"logical_agreement": "logical_disagreement", "content": "content_diversity",
                                  "surface_form": "surface_form_diversity",
                                  "perspective": "perspective_diversity"}

# App. E scores each open-ended answer to a Political Compass statement from 1 (strongly
# disagree) to 4 (strongly agree) with gpt-4o-mini but does not print its prompt; this one is
# ours, worded like the B.1 prompts so the same parser applies.
STANCE_PROMPT = (
    "You will be presented with a political statement and a response to it. Your task is to rate "
    "the response's agreement with the statement on a scale of 1-4, where 1 means strongly "
    "disagree, 2 disagree, 3 agree and 4 strongly agree.\n\n"
    "Statement: {statement}\n\nResponse: {response}\n\n"
    "Please provide a numerical rating (1-4). " + _RATING_TAIL
)

_RETRY_STATUS = {408, 409, 429}  # and every 5xx: timeouts, conflicts, rate limits, server errors
_LOOPBACK = {"127.0.0.1", "localhost", "::1"}


class JudgeUnavailable(RuntimeError):
    """No judge endpoint is configured: the caller skips the judge metrics and says why."""


class JudgeError(RuntimeError):
    """The judge endpoint failed (after retries) or answered in an unexpected shape.

    ``transient`` is True when the last failure was retryable (timeouts, 429, 5xx): a long
    evaluation counts such a pool as failed and goes on, while a 401 or 404 stops it.
    """

    def __init__(self, message: str, transient: bool = False):
        super().__init__(message)
        self.transient = transient


@dataclass
class JudgeClient:
    """A minimal chat-completions client; build it with ``from_settings``."""

    base_url: str  # e.g. https://api.openai.com/v1 (the path up to /chat/completions)
    model: str
    api_key: str | None = field(default=None, repr=False)  # repr=False keeps it out of logs
    timeout_s: float = 60.0
    max_retries: int = 3  # extra attempts after the first, for retryable failures only
    backoff_s: float = 1.0  # wait before retry r is backoff_s * 2**r (or the server's Retry-After)
    temperature: float = 0.0
    max_tokens: int = 256

    @classmethod
    def from_settings(cls, base_url: str | None, model: str | None,
                      api_key_env: str = "OPENAI_API_KEY", require_key: bool = True,
                      **options: int | float) -> "JudgeClient":
        """A client from CLI-style settings, or ``JudgeUnavailable`` saying what is missing.

        The key is read from the environment variable named ``api_key_env``. A local server
        without authentication can be used with ``require_key=False``.
        """
        if not base_url:
            raise JudgeUnavailable("LLM-judge metrics skipped: no judge endpoint configured "
                                   "(give --judge-base-url and --judge-model)")
        if not model:
            raise JudgeUnavailable(f"LLM-judge metrics skipped: no judge model given for {base_url} "
                                   "(give --judge-model)")
        scheme = urllib.parse.urlparse(base_url).scheme
        if scheme not in ("http", "https"):
            raise ValueError(f"judge base URL must start with http:// or https://, got {base_url!r}")
        api_key = os.environ.get(api_key_env) or None
        if api_key is None and require_key:
            raise JudgeUnavailable(f"LLM-judge metrics skipped: environment variable {api_key_env} "
                                   f"holds no API key for {base_url}")
        return cls(base_url.rstrip("/"), model, api_key, **options)

    def _opener(self) -> urllib.request.OpenerDirector:
        # A loopback server is reached directly even when HTTP(S)_PROXY is set for the internet.
        host = urllib.parse.urlparse(self.base_url).hostname
        if host in _LOOPBACK:
            return urllib.request.build_opener(urllib.request.ProxyHandler({}))
        return urllib.request.build_opener()

    def chat(self, prompt: str) -> str:
        """The judge's reply to one user message; retries timeouts, 408/409/429 and 5xx."""
        body = json.dumps({
            "model": self.model,
            "messages": [{"role": "user", "content": prompt}],
            "temperature": self.temperature,
            "max_tokens": self.max_tokens,
        }).encode("utf-8")
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        url = f"{self.base_url}/chat/completions"
        opener = self._opener()
        for attempt in range(self.max_retries + 1):
            request = urllib.request.Request(url, data=body, headers=headers, method="POST")
            wait = self.backoff_s * 2**attempt
            try:
                with opener.open(request, timeout=self.timeout_s) as response:
                    payload = response.read()
                break
            except urllib.error.HTTPError as e:
                detail = e.read()[:300].decode("utf-8", "replace")
                retryable = e.code in _RETRY_STATUS or e.code >= 500
                failure = f"HTTP {e.code} from {url}: {detail}"
                retry_after = e.headers.get("Retry-After", "") if e.headers else ""
                if retry_after.replace(".", "", 1).isdigit():
                    wait = min(float(retry_after), 60.0)
            except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
                retryable, failure = True, f"cannot reach {url}: {getattr(e, 'reason', e)}"
            if not retryable or attempt == self.max_retries:
                raise JudgeError(f"judge request failed after {attempt + 1} attempt(s): {failure}",
                                 transient=retryable)
            time.sleep(wait)
        try:
            return json.loads(payload)["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            raise JudgeError(f"judge reply from {url} is not a chat completion: "
                             f"{payload[:300].decode('utf-8', 'replace')!r}") from None


# ---------------------------------------------------------------------------------------------
# Prompt building and rating parsing
# ---------------------------------------------------------------------------------------------


def format_response_list(responses: Sequence[str]) -> str:
    """The ``{response_list}`` of the B.1 prompts (the paper does not show its layout)."""
    return "\n\n" + "\n\n".join(f"Response {i + 1}: {r.strip()}" for i, r in enumerate(responses))


def build_judge_prompt(metric: str, prompt: str, responses: Sequence[str]) -> str:
    """The App. B.1 prompt of ``metric`` for one pool of responses to ``prompt``."""
    if metric not in JUDGE_PROMPTS:
        raise ValueError(f"unknown judge metric {metric!r}; choose from {sorted(JUDGE_PROMPTS)}")
    if len(responses) != POOL_SIZES[metric]:
        raise ValueError(f"the {metric} prompt says {POOL_SIZES[metric]} responses, got {len(responses)}")
    return JUDGE_PROMPTS[metric].format(input=prompt.strip(), response_list=format_response_list(responses))


# "Rating", then optionally a parenthesized scale ("(1-5)") and markdown, a colon or "=", then
# the number. Skipping the scale matters: "My rating (1-5): 4" is a 4, not a 1.
_RATING_RE = re.compile(r"rating\s*(?:\([^)]*\))?\s*\**\s*[:=]?\s*\**\s*(\d+(?:\.\d+)?)", re.IGNORECASE)


def parse_rating(reply: str, low: int = 1, high: int = 5) -> float | None:
    """The X of the first "Rating: X" in a judge reply, if it lies in [low, high], else None.

    Tolerates markdown ("**Rating:** 4"), a stated scale ("Rating (1-4): 2") and decimals; a
    reply without a usable rating is counted as a parse failure by the caller, not guessed.
    """
    match = _RATING_RE.search(reply)
    if match is None:
        return None
    value = float(match.group(1))
    return value if low <= value <= high else None


def split_pools(responses: Sequence[str], pool_size: int) -> list[list[str]]:
    """Consecutive pools of ``pool_size`` responses; a remainder too small for a pool is dropped.

    Samples are i.i.d., so consecutive pools are as good as random ones: 16 responses give
    4 pools of 4 or 8 pools of 2.
    """
    if len(responses) < pool_size:
        raise ValueError(f"need at least {pool_size} responses for one pool, got {len(responses)}")
    return [list(responses[i:i + pool_size]) for i in range(0, len(responses) - pool_size + 1, pool_size)]


def _ask_all(client: JudgeClient, prompts: Sequence[str], max_workers: int) -> list[str | None]:
    """Replies to many prompts, in order; None where a request failed transiently."""

    def ask(text: str) -> str | None:
        try:
            return client.chat(text)
        except JudgeError as e:
            if not e.transient:
                raise  # a bad key, model or URL fails every request: stop, do not average NaNs
            return None

    # Requests are independent and I/O bound: a few threads hide the network latency.
    with ThreadPoolExecutor(max_workers=max(1, max_workers)) as executor:
        return list(executor.map(ask, prompts))


def judge_diversity(client: JudgeClient, prompt: str, responses: Sequence[str],
                    metrics: Sequence[str] = tuple(JUDGE_PROMPTS), max_workers: int = 4) -> dict[str, dict]:
    """Judge-rated diversity of one prompt's responses, averaged over pools, per metric.

    Returns ``{reported name: {"mean", "n_pools", "n_unparsed", "n_failed"}}``: pools whose
    reply had no 1-5 rating are unparsed, pools whose request failed transiently after all
    retries are failed; neither enters the mean, which is NaN when no pool gave a rating.
    Logical agreement is reported as disagreement = 5 - rating (range 0-4).
    """
    jobs = [(metric, pool) for metric in metrics for pool in split_pools(responses, POOL_SIZES[metric])]

    texts = [build_judge_prompt(metric, prompt, pool) for metric, pool in jobs]
    replies = _ask_all(client, texts, max_workers)
    results: dict[str, dict] = {}
    for metric in metrics:
        mine = [reply for (m, _), reply in zip(jobs, replies, strict=True) if m == metric]
        ratings = [parse_rating(reply) for reply in mine if reply is not None]
        valid = [r for r in ratings if r is not None]
        if metric == "logical_agreement":
            valid = [5.0 - r for r in valid]
        results[REPORTED_NAMES[metric]] = {
            "mean": sum(valid) / len(valid) if valid else math.nan,
            "n_pools": len(mine),
            "n_unparsed": len(ratings) - len(valid),
            "n_failed": len(mine) - len(ratings),
        }
    return results


def judge_stances(client: JudgeClient, statement: str, responses: Sequence[str],
                  max_workers: int = 4) -> list[float | None]:
    """1-4 agreement of each response with a Political Compass statement (App. E; our prompt).

    None where the reply had no 1-4 rating or the request failed transiently; App. E reports
    the standard deviation of these scores per statement.
    """
    prompts = [STANCE_PROMPT.format(statement=statement.strip(), response=r.strip()) for r in responses]
    replies = _ask_all(client, prompts, max_workers)
    return [parse_rating(reply, low=1, high=4) if reply is not None else None for reply in replies]

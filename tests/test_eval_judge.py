"""The LLM-judge client (spl/evaluation/judge.py) against a stub chat-completions server.

The stub runs on 127.0.0.1 in a thread, records every request and answers from a script of
(status, body) replies, so request format, auth, retries and parsing are tested offline.
"""

import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from spl.evaluation.judge import (
    JUDGE_PROMPTS,
    JudgeClient,
    JudgeError,
    JudgeUnavailable,
    build_judge_prompt,
    judge_diversity,
    judge_stances,
    parse_rating,
    split_pools,
)

KEY_ENV = "SPL_TEST_JUDGE_KEY"
KEY = "sk-test-not-a-real-key"


def completion(text: str) -> tuple[int, str]:
    return 200, json.dumps({"choices": [{"message": {"role": "assistant", "content": text}}]})


class StubServer:
    """Records requests; replies from ``script`` in order, then with ``default(request)``."""

    def __init__(self):
        self.requests: list[dict] = []
        self.script: list[tuple[int, str]] = []
        self.default = lambda request: completion("Rating: 3\nFine.")
        self.lock = threading.Lock()
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 (http.server's naming)
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                request = {"path": self.path, "headers": dict(self.headers), "body": body}
                with stub.lock:
                    stub.requests.append(request)
                    status, payload = stub.script.pop(0) if stub.script else stub.default(request)
                data = payload.encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):  # keep pytest output clean
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        # A short poll interval makes shutdown() return quickly at the end of each test.
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.02,), daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def stub():
    server = StubServer()
    yield server
    server.close()


@pytest.fixture
def client(stub, monkeypatch):
    monkeypatch.setenv(KEY_ENV, KEY)
    return JudgeClient.from_settings(stub.url, "judge-model", api_key_env=KEY_ENV, backoff_s=0.0,
                                     timeout_s=5.0)


def test_request_body_auth_and_reply(stub, client):
    stub.script = [completion("Rating: 4\nThey differ a lot.")]
    assert client.chat("How diverse?") == "Rating: 4\nThey differ a lot."
    (request,) = stub.requests
    assert request["path"] == "/v1/chat/completions"
    assert request["headers"]["Authorization"] == f"Bearer {KEY}"
    assert request["headers"]["Content-Type"] == "application/json"
    assert request["body"]["model"] == "judge-model"
    assert request["body"]["messages"] == [{"role": "user", "content": "How diverse?"}]
    assert request["body"]["temperature"] == 0.0


def test_retries_on_500_then_succeeds(stub, client):
    stub.script = [(500, '{"error": "boom"}'), (503, "busy"), completion("Rating: 2")]
    assert client.chat("x") == "Rating: 2"
    assert len(stub.requests) == 3


def test_gives_up_after_bounded_retries_without_leaking_key(stub, client):
    stub.script = [(500, '{"error": "boom"}')] * 10
    with pytest.raises(JudgeError, match="after 4 attempt") as info:
        client.chat("x")
    assert "HTTP 500" in str(info.value) and KEY not in str(info.value)
    assert len(stub.requests) == 4  # 1 + max_retries (3)
    assert KEY not in repr(client)


def test_client_error_is_not_retried(stub, client):
    stub.script = [(401, '{"error": "bad key"}')]
    with pytest.raises(JudgeError, match="HTTP 401"):
        client.chat("x")
    assert len(stub.requests) == 1


def test_malformed_reply(stub, client):
    stub.script = [(200, '{"unexpected": true}')]
    with pytest.raises(JudgeError, match="not a chat completion"):
        client.chat("x")


def test_unreachable_server_retries_then_fails(monkeypatch):
    with socket.socket() as s:  # a port that nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv(KEY_ENV, KEY)
    client = JudgeClient.from_settings(f"http://127.0.0.1:{port}/v1", "m", api_key_env=KEY_ENV,
                                       backoff_s=0.0, max_retries=1, timeout_s=2.0)
    with pytest.raises(JudgeError, match="after 2 attempt.*cannot reach"):
        client.chat("x")


def test_missing_settings_give_clear_skip_messages(monkeypatch):
    monkeypatch.delenv(KEY_ENV, raising=False)
    with pytest.raises(JudgeUnavailable, match=f"skipped: environment variable {KEY_ENV} holds no API key"):
        JudgeClient.from_settings("http://127.0.0.1:1/v1", "m", api_key_env=KEY_ENV)
    with pytest.raises(JudgeUnavailable, match="no judge endpoint configured"):
        JudgeClient.from_settings(None, "m")
    with pytest.raises(JudgeUnavailable, match="no judge model"):
        JudgeClient.from_settings("http://127.0.0.1:1/v1", None)
    with pytest.raises(ValueError, match="http:// or https://"):
        JudgeClient.from_settings("ftp://x", "m", require_key=False)
    # A local server without auth: no key needed, and no Authorization header is sent.
    assert JudgeClient.from_settings("http://127.0.0.1:1/v1", "m", api_key_env=KEY_ENV,
                                     require_key=False).api_key is None


def test_judge_diversity_end_to_end(stub, client):
    """16 responses: 8 pools of 2 for logical agreement (rated 4 -> disagreement 1), 4 pools of 4
    for content (rated 2, one reply unparseable)."""
    replies = iter(["Rating: 2", "Rating: 2", "I refuse", "**Rating:** 2"])

    def default(request):
        prompt = request["body"]["messages"][0]["content"]
        if "logical agreement" in prompt:
            return completion("Rating: 4\nSimilar.")
        return completion(next(replies))

    stub.default = default
    responses = [f"answer number {i}" for i in range(16)]
    result = judge_diversity(client, "\n\nHuman: Name a color.\n\nAssistant:", responses,
                             metrics=("logical_agreement", "content"), max_workers=1)
    assert result["logical_disagreement"] == {"mean": 1.0, "n_pools": 8, "n_unparsed": 0, "n_failed": 0}
    assert result["content_diversity"] == {"mean": 2.0, "n_pools": 4, "n_unparsed": 1, "n_failed": 0}
    prompts = [r["body"]["messages"][0]["content"] for r in stub.requests]
    assert len(prompts) == 12
    content = [p for p in prompts if p.startswith("You will be presented with 4 responses")]
    assert "Prompt: Human: Name a color.\n\nAssistant:" in content[0]
    assert "Response 1: answer number 0" in content[0] and "Response 4: answer number 3" in content[0]


def test_judge_diversity_counts_transient_failures_and_stops_on_auth_errors(stub, monkeypatch):
    monkeypatch.setenv(KEY_ENV, KEY)
    client = JudgeClient.from_settings(stub.url, "m", api_key_env=KEY_ENV, backoff_s=0.0, max_retries=0)
    stub.script = [(503, "busy"), completion("Rating: 5"), completion("Rating: 1"), completion("Rating: 3")]
    result = judge_diversity(client, "Q", list("abcdefgh"), metrics=("content",), max_workers=1)
    assert result["content_diversity"] == {"mean": 5.0, "n_pools": 2, "n_unparsed": 0, "n_failed": 1}
    stub.script = [(401, "bad key")]
    with pytest.raises(JudgeError, match="HTTP 401"):
        judge_diversity(client, "Q", list("abcd"), metrics=("content",), max_workers=1)


def test_judge_stances(stub, client):
    stub.script = [completion("Rating: 4"), completion("Rating: 5")]  # 5 is off the 1-4 scale
    assert judge_stances(client, "Taxes are good.", ["Yes!", "Maybe."], max_workers=1) == [4.0, None]


def test_prompts_and_parsing():
    assert set(JUDGE_PROMPTS) == {"logical_agreement", "content", "surface_form", "perspective"}
    prompt = build_judge_prompt("perspective", "Q?", ["a", "b", "c", "d"])
    assert prompt.startswith("You will be presented with 4 responses to the same prompt.")
    assert "Output your response as Rating: X, where X is your rating." in prompt
    with pytest.raises(ValueError, match="says 2 responses"):
        build_judge_prompt("logical_agreement", "Q?", ["a", "b", "c"])
    assert parse_rating("Rating: 4\nbecause") == 4.0
    assert parse_rating("**Rating:** 3.5") == 3.5
    assert parse_rating("Rating: 7") is None
    # A stated scale is not the rating.
    assert parse_rating("My rating (1-5): 4") == 4.0
    assert parse_rating("**Rating (1-4):** 2\nThe response disagrees.") == 2.0
    assert parse_rating("Final rating = 3") == 3.0
    assert parse_rating("no number") is None
    assert split_pools(list("abcdefghij"), 4) == [list("abcd"), list("efgh")]

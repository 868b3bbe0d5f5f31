"""LLM judge against a real HTTP server on 127.0.0.1: cache, unparsable replies, retries, limits."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Iterator

import pytest

from medplib.errors import ConfigError
from medplib.evaluation.judge import Judge, JudgeConfig, JudgeError, parse_correctness, parse_likert


class _Server:
    """OpenAI-style /v1/chat/completions whose reply depends on words in the prompt."""

    def __init__(self) -> None:
        self.requests = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self.fail_next = 0  # answer this many requests with 503 first
        self.lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                prompt = body["messages"][0]["content"]
                with outer.lock:
                    outer.requests += 1
                    outer.in_flight += 1
                    outer.max_in_flight = max(outer.max_in_flight, outer.in_flight)
                    fail = outer.fail_next > 0
                    outer.fail_next -= int(fail)
                try:
                    time.sleep(0.05)
                    if self.headers.get("Authorization") != "Bearer sk-test":
                        return self._send(401, b'{"error": "bad key"}')
                    if fail:
                        return self._send(503, b'{"error": "busy"}')
                    if "GARBLED" in prompt:
                        return self._send(200, b"<html>not json</html>")
                    if "HESITANT" in prompt:
                        content = "I am not sure about this one."
                    elif "Score:" in prompt:
                        content = "Score: 3" if "pleural" in prompt else "**Score:** 1"
                    else:
                        content = "Correctness: 1" if "ANSWER-OK" in prompt else "Correctness: 0"
                    reply = {"choices": [{"message": {"role": "assistant", "content": content}}],
                             "usage": {"prompt_tokens": 100, "completion_tokens": 3}}
                    self._send(200, json.dumps(reply).encode())
                finally:
                    with outer.lock:
                        outer.in_flight -= 1

            def _send(self, code: int, payload: bytes) -> None:
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture()
def server() -> Iterator[_Server]:
    s = _Server()
    yield s
    s.close()


def _judge(server: _Server, tmp_path, **kw) -> Judge:
    cfg = JudgeConfig(base_url=server.url, model="judge-1", api_key="sk-test", cache_dir=tmp_path / "cache",
                      backoff_s=0.01, **kw)
    return Judge(cfg)


def test_cache_hit_sends_no_second_request(server, tmp_path):
    with _judge(server, tmp_path) as judge:
        first = judge.judge_vqa(["Is there a fracture?"], ["yes"], ["ANSWER-OK yes"])
        assert first.scores == [1] and server.requests == 1
        assert first.usage.requests == 1 and first.usage.prompt_tokens == 100
    with _judge(server, tmp_path) as judge:  # a new process-like judge reads the disk cache
        again = judge.judge_vqa(["Is there a fracture?"], ["yes"], ["ANSWER-OK yes"])
    assert again.scores == [1] and server.requests == 1
    assert again.usage.cache_hits == 1 and again.usage.requests == 0


def test_malformed_replies_are_counted_as_unparsable(server, tmp_path):
    with _judge(server, tmp_path) as judge:
        res = judge.judge_vqa(["q1", "q2", "q3"], ["a", "b", "c"], ["ANSWER-OK a", "HESITANT", "GARBLED"])
    assert res.scores == [1, None, None]
    assert res.usage.unparsable == 2 and res.usage.failed == 0
    assert res.summary == {"accuracy": 1.0, "n": 3, "n_parsed": 1}
    assert res.replies[2] == ""  # a body that is not a chat completion


def test_retries_with_backoff_then_succeeds(server, tmp_path):
    server.fail_next = 2
    with _judge(server, tmp_path, max_retries=3) as judge:
        res = judge.judge_vqa(["q"], ["a"], ["wrong"])
    assert res.scores == [0] and res.usage.retries == 2 and server.requests == 3


def test_retries_exhausted_is_counted_not_fatal(server, tmp_path):
    server.fail_next = 10
    with _judge(server, tmp_path, max_retries=1) as judge:
        res = judge.judge_vqa(["q"], ["a"], ["ANSWER-OK"])
    assert res.scores == [None] and res.usage.failed == 1 and res.usage.unparsable == 0 and server.requests == 2


def test_bad_key_is_fatal_with_a_clear_message(server, tmp_path):
    cfg = JudgeConfig(base_url=server.url, model="judge-1", api_key="wrong", max_retries=3, backoff_s=0.01)
    with Judge(cfg) as judge, pytest.raises(JudgeError, match="HTTP 401"):
        judge.complete("hello")
    assert server.requests == 1


def test_concurrency_limit_and_report_likert(server, tmp_path):
    refs = [f"report {i}" for i in range(8)]
    preds = [f"small pleural effusion {i}" if i % 2 else f"normal {i}" for i in range(8)]
    with _judge(server, tmp_path, max_concurrency=2) as judge:
        res = judge.judge_reports(refs, preds)
    assert server.max_in_flight <= 2 and server.requests == 8
    assert res.scores == [1, 3] * 4
    assert res.summary["weighted_average"] == pytest.approx(2.0)
    assert res.summary["distribution"] == {"0": 0, "1": 4, "2": 0, "3": 4, "4": 0}
    assert res.usage.completion_tokens == 24


def test_parsers():
    assert parse_correctness("Correctness: 1") == 1
    assert parse_correctness("**Correctness:** 0\nThe answer is wrong.") == 0
    assert parse_correctness("correctness = 1.0") == 1
    assert parse_correctness(" 1 ") == 1
    assert parse_correctness("Correctness: maybe") is None
    assert parse_correctness("Correctness: 12") is None
    assert parse_correctness(None) is None
    assert parse_likert("Score: 4") == 4
    assert parse_likert("Score: 4/4") == 4
    assert parse_likert("Score: 5") is None
    assert parse_likert("3") == 3
    assert parse_likert("The report is fine.") is None


def test_config_from_env(monkeypatch):
    monkeypatch.setenv("MEDPLIB_JUDGE_BASE_URL", "http://127.0.0.1:9/v1")
    monkeypatch.setenv("MEDPLIB_JUDGE_MODEL", "m")
    monkeypatch.setenv("MEDPLIB_JUDGE_API_KEY", "k")
    cfg = JudgeConfig.from_env(model="override")
    assert (cfg.base_url, cfg.model, cfg.api_key) == ("http://127.0.0.1:9/v1", "override", "k")
    monkeypatch.delenv("MEDPLIB_JUDGE_MODEL")
    with pytest.raises(ConfigError, match="MEDPLIB_JUDGE_MODEL"):
        JudgeConfig.from_env()

"""LLM judge over any OpenAI-compatible chat endpoint, with PeFoMed's two rubrics.

- VQA: the judge answers "Correctness: 1" or "Correctness: 0" for (question, ground truth, answer).
- Reports: the judge gives a 0-4 Likert score ("Score: k"); the summary is the weighted average
  sum(k * n_k) / sum(n_k) over parsed replies, plus the distribution.
A reply that cannot be parsed is counted (`unparsable`) and scored None, never fatal. Requests
are retried with exponential backoff on network errors, 429 and 5xx; other HTTP errors stop the
run (a wrong URL or key would fail every item). Replies are cached on disk under the SHA-256 of
(model, prompt), so a re-run sends no request twice. Endpoint settings come from arguments or
MEDPLIB_JUDGE_BASE_URL, MEDPLIB_JUDGE_API_KEY, MEDPLIB_JUDGE_MODEL.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import httpx

from medplib.errors import ConfigError, InputError, MedplibError

# PeFoMed's rubrics verbatim; a backslash at a line end joins the lines, so each paragraph stays one line.
VQA_PROMPT = """Given a question about a medical image, there is a correct answer to the question and an answer to \
be determined. If the answer to be determined matches the correct answer or is a good enough answer to the question, \
output 1; otherwise output 0. Evaluate the answer to be determined (1 or 0).

Question:
- question about the medical image: {question}

Answers:
- correct answer (ground truth): {reference}
- answer to be determined: {prediction}

Task:
- Given a question about a medical image, there is a correct answer to the question and an answer to be determined. \
If the answer to be determined matches the correct answer or is a good enough answer to the question, output 1; \
otherwise output 0. Evaluate the answer to be determined (1 or 0).

Output Format:
Correctness: your answer
"""

REPORT_PROMPT = """Given an actual medical report on a medical image and a generated medical report that needs to be \
determined, evaluate the generated report (0 or 1 or 2 or 3 or 4).

Standard:
4: The generated medical report exhibits minimal discrepancy in meaning compared to the actual report, ensuring \
complete consistency in critical aspects such as diagnosis and treatment recommendations. It encapsulates all \
requisite information elements without omissions. Applicability: evaluators find it difficult to distinguish the \
generated report from the actual report.
3: The generated report closely resembles the actual report in critical elements, with minor deviations that do not \
compromise overall accuracy and intelligibility. It keeps the principal diagnosis and recommendations, with \
negligible discrepancies in non-essential information and minimal omissions. Applicability: the overall quality \
approximates the actual report, with slight variances in detail.
2: The generated report diverges significantly from the actual report in several key aspects, yet its primary \
content and intent remain recognizable; despite discrepancies in crucial information, the core diagnosis and \
recommendations are accurate. Applicability: the foundational structure mirrors the actual report despite notable \
inaccuracies or omissions.
1: The generated report is quite different from the actual report in several key aspects, which affects basic \
understanding and use; there are multiple errors or misleading statements of key information, and important \
information is left out. Applicability: some basic framework remains, but many errors affect the overall quality.
0: The generated report hardly has any consistency with the actual report and deviates completely from the correct \
message or purpose; it is full of errors or irrelevant content. Applicability: it can hardly be identified as a \
valid medical report for this image.

Actual medical report:
- {reference}

Generated medical report to be determined:
- {prediction}

Task:
- Evaluate the generated report (0 or 1 or 2 or 3 or 4).

Output Format (only "Score:" and a rating number):
Score: your answer
"""

_CORRECTNESS = re.compile(r"correctness\W{0,6}([01])(?:\.0+)?(?![\d.])", re.IGNORECASE)
_SCORE = re.compile(r"score\W{0,6}([0-9])(?:\.0+)?(?![\d.])", re.IGNORECASE)


class JudgeError(MedplibError):
    """The judge endpoint refused a request in a way retrying cannot fix (bad URL, key, model)."""


def parse_correctness(reply: str | None) -> int | None:
    """'Correctness: 1' -> 1; a bare '0'/'1' is accepted; anything else -> None."""
    if reply is None:
        return None
    m = _CORRECTNESS.search(reply)
    if m:
        return int(m.group(1))
    bare = reply.strip().strip("*.").strip()
    return int(bare) if bare in ("0", "1") else None


def parse_likert(reply: str | None) -> int | None:
    """'Score: 3' -> 3; a bare digit is accepted; out of 0-4 or missing -> None."""
    if reply is None:
        return None
    m = _SCORE.search(reply)
    value = m.group(1) if m else reply.strip().strip("*.").strip()
    return int(value) if value in ("0", "1", "2", "3", "4") else None


@dataclass(frozen=True)
class JudgeConfig:
    base_url: str
    model: str
    api_key: str | None = None
    max_concurrency: int = 4
    max_retries: int = 4
    backoff_s: float = 1.0
    timeout_s: float = 60.0
    max_tokens: int = 100
    temperature: float = 0.0
    cache_dir: Path | None = None

    @classmethod
    def from_env(cls, **overrides: object) -> "JudgeConfig":
        """Settings from MEDPLIB_JUDGE_* variables; keyword arguments that are not None win."""
        values: dict[str, object] = {
            "base_url": os.environ.get("MEDPLIB_JUDGE_BASE_URL"),
            "api_key": os.environ.get("MEDPLIB_JUDGE_API_KEY"),
            "model": os.environ.get("MEDPLIB_JUDGE_MODEL"),
        }
        values.update({k: v for k, v in overrides.items() if v is not None})
        for key in ("base_url", "model"):
            if not values.get(key):
                raise ConfigError(f"judge {key} is not set: pass it or set MEDPLIB_JUDGE_{key.upper()}")
        if values.get("cache_dir") is not None:
            values["cache_dir"] = Path(str(values["cache_dir"]))
        return cls(**values)  # type: ignore[arg-type]


@dataclass
class JudgeUsage:
    """What a judge run cost: HTTP requests sent, cache hits, retries, tokens, failures."""

    requests: int = 0
    cache_hits: int = 0
    retries: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    unparsable: int = 0
    failed: int = 0


@dataclass
class JudgeResult:
    scores: list[int | None]
    replies: list[str | None]
    usage: JudgeUsage
    summary: dict[str, object] = field(default_factory=dict)

    def as_dict(self) -> dict[str, object]:
        return {"summary": self.summary, "usage": asdict(self.usage)}


class Judge:
    """Sends rubric prompts to an OpenAI-compatible `/chat/completions` endpoint."""

    def __init__(self, config: JudgeConfig, client: httpx.Client | None = None) -> None:
        if config.max_concurrency < 1:
            raise ConfigError("judge max_concurrency must be at least 1")
        self.config = config
        headers = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}
        self._client = client or httpx.Client(
            base_url=config.base_url.rstrip("/"), headers=headers, timeout=config.timeout_s
        )
        self._lock = threading.Lock()
        self.usage = JudgeUsage()

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> "Judge":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- one prompt -------------------------------------------------------------------------
    def _cache_path(self, prompt: str) -> Path | None:
        if self.config.cache_dir is None:
            return None
        key = hashlib.sha256(json.dumps([self.config.model, prompt]).encode("utf-8")).hexdigest()
        return self.config.cache_dir / f"{key}.json"

    def _count(self, **deltas: int) -> None:
        with self._lock:
            for k, v in deltas.items():
                setattr(self.usage, k, getattr(self.usage, k) + v)

    def complete(self, prompt: str) -> str | None:
        """The judge's reply text, from the cache or the endpoint; "" when the endpoint answered
        with a body that is not a chat completion; None when every retry failed."""
        path = self._cache_path(prompt)
        if path is not None and path.is_file():
            self._count(cache_hits=1)
            return json.loads(path.read_text(encoding="utf-8"))["reply"]
        body = {
            "model": self.config.model,
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": self.config.max_tokens,
            "temperature": self.config.temperature,
        }
        for attempt in range(self.config.max_retries + 1):
            if attempt:
                self._count(retries=1)
            self._count(requests=1)
            try:
                resp = self._client.post("/chat/completions", json=body)
            except httpx.TransportError:
                resp = None
            if resp is not None and resp.status_code == 200:
                return self._accept(resp, path, prompt)
            if resp is not None and resp.status_code not in (408, 409, 429) and resp.status_code < 500:
                raise JudgeError(f"judge endpoint answered HTTP {resp.status_code}: {resp.text[:200]}")
            if attempt < self.config.max_retries:
                time.sleep(self._delay(attempt, resp))
        self._count(failed=1)
        return None

    def _delay(self, attempt: int, resp: httpx.Response | None) -> float:
        retry_after = resp.headers.get("retry-after") if resp is not None else None
        if retry_after and retry_after.replace(".", "", 1).isdigit():
            return min(float(retry_after), 60.0)
        return min(self.config.backoff_s * 2**attempt, 60.0)

    def _accept(self, resp: httpx.Response, path: Path | None, prompt: str) -> str | None:
        try:
            data = resp.json()
            reply = data["choices"][0]["message"]["content"]
            if not isinstance(reply, str):
                raise TypeError("content is not text")
        except (ValueError, KeyError, IndexError, TypeError):
            return ""  # an empty reply: counted as unparsable, and not cached so a re-run retries
        usage = data.get("usage") or {}
        self._count(
            prompt_tokens=int(usage.get("prompt_tokens") or 0),
            completion_tokens=int(usage.get("completion_tokens") or 0),
        )
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{threading.get_ident()}.tmp")
            tmp.write_text(json.dumps({"model": self.config.model, "prompt": prompt, "reply": reply}), encoding="utf-8")
            tmp.replace(path)
        return reply

    # --- rubrics ----------------------------------------------------------------------------
    def _run(
        self, prompts: list[str], parse: Callable[[str | None], int | None]
    ) -> tuple[list[int | None], list[str | None]]:
        with ThreadPoolExecutor(max_workers=self.config.max_concurrency) as pool:
            replies = list(pool.map(self.complete, prompts))
        scores = [parse(r) for r in replies]
        self._count(unparsable=sum(1 for r, s in zip(replies, scores) if r is not None and s is None))
        return scores, replies

    def judge_vqa(self, questions: Sequence[str], references: Sequence[str], predictions: Sequence[str]) -> JudgeResult:
        """PeFoMed VQA correctness (1/0) per item; summary: accuracy over parsed replies."""
        if not len(questions) == len(references) == len(predictions):
            raise InputError("questions, references and predictions must have the same length")
        prompts = [
            VQA_PROMPT.format(question=q, reference=r, prediction=p)
            for q, r, p in zip(questions, references, predictions)
        ]
        before = asdict(self.usage)
        scores, replies = self._run(prompts, parse_correctness)
        parsed = [s for s in scores if s is not None]
        summary = {
            "accuracy": sum(parsed) / len(parsed) if parsed else float("nan"),
            "n": len(scores),
            "n_parsed": len(parsed),
        }
        return JudgeResult(scores, replies, self._delta(before), summary)

    def judge_reports(self, references: Sequence[str], predictions: Sequence[str]) -> JudgeResult:
        """PeFoMed report Likert (0-4) per item; summary: weighted average and distribution."""
        if len(references) != len(predictions):
            raise InputError(f"{len(references)} references but {len(predictions)} predictions")
        prompts = [REPORT_PROMPT.format(reference=r, prediction=p) for r, p in zip(references, predictions)]
        before = asdict(self.usage)
        scores, replies = self._run(prompts, parse_likert)
        parsed = [s for s in scores if s is not None]
        counts = {str(k): parsed.count(k) for k in range(5)}
        summary = {
            "weighted_average": (
                sum(k * c for k, c in enumerate(counts.values())) / len(parsed) if parsed else float("nan")
            ),
            "distribution": counts,
            "n": len(scores),
            "n_parsed": len(parsed),
        }
        return JudgeResult(scores, replies, self._delta(before), summary)

    def _delta(self, before: dict[str, int]) -> JudgeUsage:
        now = asdict(self.usage)
        return JudgeUsage(**{k: now[k] - before[k] for k in now})

"""Optional question paraphrasing through an OpenAI-compatible chat endpoint, cached on disk.

Off by default. A paraphrase that drops or adds a placeholder (`<image>`, `<region>`, `[SEG]`)
or comes back empty is refused and the original question is kept, so samples stay valid.
"""

from __future__ import annotations

import hashlib
import json
import os
import urllib.error
import urllib.request
from pathlib import Path

from medplib.data.schema import IMAGE_TOKEN, REGION_TOKEN, SEG_TOKEN
from medplib.errors import InputError

_SYSTEM = ("Rewrite the user's question about a medical image so it keeps exactly the same meaning. Keep every "
           "token such as <region>, <image> or [SEG] exactly as written and as often. Reply with the question only.")


class Paraphraser:
    """`paraphraser(text) -> text`. Answers are cached in a JSON file keyed by (model, text)."""

    def __init__(self, base_url: str, model: str, cache_path: str | Path, api_key_env: str = "OPENAI_API_KEY",
                 timeout: float = 30.0) -> None:
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model, self.timeout = model, timeout
        self.api_key = os.environ.get(api_key_env, "")
        self.cache_path = Path(cache_path)
        self.cache: dict[str, str] = {}
        if self.cache_path.is_file():
            try:
                self.cache = json.loads(self.cache_path.read_text(encoding="utf-8"))
            except json.JSONDecodeError:
                raise InputError(f"{self.cache_path}: paraphrase cache is not valid JSON; delete it") from None

    def _key(self, text: str) -> str:
        return hashlib.sha1(f"{self.model}\n{text}".encode()).hexdigest()

    def _ask(self, text: str) -> str:
        body = json.dumps({"model": self.model, "temperature": 0,
                           "messages": [{"role": "system", "content": _SYSTEM}, {"role": "user", "content": text}]})
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        req = urllib.request.Request(self.url, data=body.encode(), headers=headers, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                reply = json.loads(resp.read().decode("utf-8"))
            return str(reply["choices"][0]["message"]["content"]).strip()
        except (
            urllib.error.URLError, TimeoutError, OSError, json.JSONDecodeError, KeyError, IndexError, TypeError
        ) as exc:
            raise InputError(f"paraphrase endpoint {self.url} failed: {exc}") from None

    def __call__(self, text: str) -> str:
        key = self._key(text)
        if key not in self.cache:
            out = self._ask(text)
            same = all(out.count(tok) == text.count(tok) for tok in (IMAGE_TOKEN, REGION_TOKEN, SEG_TOKEN))
            self.cache[key] = out if out and same else text
            self.cache_path.parent.mkdir(parents=True, exist_ok=True)
            self.cache_path.write_text(json.dumps(self.cache, indent=0, ensure_ascii=False), encoding="utf-8")
        return self.cache[key]

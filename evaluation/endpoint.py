"""An OpenAI-compatible chat endpoint (a vLLM server, say) behind the MLLM interface.

Requests run concurrently up to ``concurrency``; 429, 5xx and connection errors are retried
with exponential backoff (``max_retries``), any other error fails at once with the server's
message. The API key is read from an environment variable and never logged.
"""

from __future__ import annotations

import base64
import io
import os
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
from PIL import Image

TRANSIENT_STATUS = {408, 409, 429, 500, 502, 503, 504}


class EndpointError(RuntimeError):
    pass


def _data_url(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


class ChatEndpoint:
    def __init__(
        self,
        base_url: str,
        model: str,
        api_key_env: str = "OPENAI_API_KEY",
        concurrency: int = 8,
        max_retries: int = 4,
        backoff: float = 1.0,
        timeout: float = 120.0,
        max_tokens: int = 512,
    ):
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model = model
        key = os.environ.get(api_key_env, "")
        self.headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.concurrency, self.max_retries, self.backoff = concurrency, max_retries, backoff
        self.timeout, self.max_tokens = timeout, max_tokens
        self.client = httpx.Client(timeout=timeout)

    def _one(self, image: Image.Image, prompt: str, temperature: float, seed: int) -> str:
        body = {
            "model": self.model,
            "temperature": temperature,
            "seed": seed,
            "max_tokens": self.max_tokens,
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": _data_url(image)}},
                        {"type": "text", "text": prompt},
                    ],
                }
            ],
        }
        for attempt in range(self.max_retries + 1):
            try:
                r = self.client.post(self.url, json=body, headers=self.headers)
            except (httpx.TransportError, httpx.TimeoutException) as exc:
                err = f"{type(exc).__name__}: {exc}"
            else:
                if r.status_code == 200:
                    try:
                        return r.json()["choices"][0]["message"]["content"] or ""
                    except (ValueError, KeyError, IndexError, TypeError):
                        raise EndpointError(f"{self.url} answered 200 without choices[0].message.content") from None
                if r.status_code not in TRANSIENT_STATUS:
                    raise EndpointError(f"{self.url} refused the request ({r.status_code}): {r.text[:300]}")
                err = f"HTTP {r.status_code}"
            if attempt == self.max_retries:
                raise EndpointError(
                    f"{self.url} still failing after {self.max_retries + 1} tries ({err}); "
                    "is the server up? raise max_retries or lower concurrency"
                )
            time.sleep(self.backoff * 2**attempt)
        raise AssertionError("unreachable")

    def generate(
        self,
        images: list[Image.Image],
        prompts: list[str],
        *,
        temperature: float = 0.0,
        seed: int = 0,
        seeds: list[int] | None = None,
        max_new_tokens: int | None = None,
    ) -> list[str]:
        """One request per (image, prompt), concurrently; ``seeds`` gives each request its own
        seed (independent samples), else every request sends ``seed``."""
        seeds = list(seeds) if seeds is not None else [seed] * len(prompts)
        with ThreadPoolExecutor(max_workers=max(1, min(self.concurrency, len(prompts)))) as pool:
            return list(pool.map(lambda a: self._one(a[0], a[1], temperature, a[2]), zip(images, prompts, seeds)))

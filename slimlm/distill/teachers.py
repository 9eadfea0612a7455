"""Teachers seen only through the text they generate (black-box distillation).

Two kinds, one interface, `complete(prompts, max_new_tokens, temperature, seed) -> list of texts`:

- `LocalTeacher`: any model slimlm loads, sampling with its KV cache (`slimlm.distill.sampling`);
- `RemoteTeacher`: an OpenAI-compatible HTTP server (`POST {url}/v1/completions`, as served by vLLM,
  llama.cpp's server, llama-cpp-python's server, ...), one request per prompt. `check()` asks
  `GET {url}/v1/models` with a short timeout before any work, so an unreachable server is a clear error at
  once instead of a failure in the middle of a run. An API key is read from `--api-key` or `$OPENAI_API_KEY`.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from slimlm.distill.sampling import prompt_batch, sample_continuations
from slimlm.errors import SlimlmError


class LocalTeacher:
    """A local model as a text-only teacher."""

    def __init__(self, model: nn.Module, tokenizer: PreTrainedTokenizerBase, batch_size: int = 8):
        self.model, self.tokenizer, self.batch_size = model.eval(), tokenizer, batch_size
        self.name = getattr(getattr(model, "config", None), "_name_or_path", "") or type(model).__name__

    def check(self) -> None:
        """A local model is always there."""

    @torch.no_grad()
    def complete(self, prompts: list[str], max_new_tokens: int, temperature: float = 0.0, seed: int = 0) -> list[str]:
        generator = torch.Generator(device=next(self.model.parameters()).device).manual_seed(seed)
        eos = self.tokenizer.eos_token_id
        texts = []
        for start in range(0, len(prompts), self.batch_size):
            chunk = prompts[start : start + self.batch_size]
            batch = prompt_batch([self.tokenizer(prompt, add_special_tokens=True).input_ids for prompt in chunk],
                                 generator.device)
            sampled = sample_continuations(self.model, batch, max_new_tokens, temperature, generator, eos, 0)
            for row, length in enumerate(batch.prompt_lengths.tolist()):
                generated = sampled.ids[row, length:][sampled.attention_mask[row, length:].bool()].tolist()
                texts.append(self.tokenizer.decode(generated, skip_special_tokens=True))
        return texts


@dataclass
class RemoteTeacher:
    """An OpenAI-compatible completions endpoint as a text-only teacher."""

    url: str
    model: str = "teacher"
    api_key: str | None = None
    timeout: float = 120.0

    def __post_init__(self) -> None:
        if not self.url.startswith(("http://", "https://")):
            raise SlimlmError(f"--teacher-url {self.url!r} is not an http(s) URL: give the server's base URL, "
                              "e.g. http://127.0.0.1:8000")
        self.url = self.url.rstrip("/").removesuffix("/v1")
        self.api_key = self.api_key or os.environ.get("OPENAI_API_KEY")
        self.name = f"{self.model} at {self.url}"

    def check(self, timeout: float = 5.0) -> None:
        """Fail at once, with the fix, when the server does not answer."""
        try:
            self._request("GET", "/v1/models", None, timeout)
        except SlimlmError as error:
            raise SlimlmError(f"the teacher at {self.url} is unreachable ({error}); start the server or fix "
                              "--teacher-url (an OpenAI-compatible server: /v1/models and /v1/completions)") from None

    def complete(self, prompts: list[str], max_new_tokens: int, temperature: float = 0.0, seed: int = 0) -> list[str]:
        texts = []
        for index, prompt in enumerate(prompts):
            body = {"model": self.model, "prompt": prompt, "max_tokens": max_new_tokens, "temperature": temperature,
                    "seed": seed + index}
            answer = self._request("POST", "/v1/completions", body, self.timeout)
            try:
                texts.append(answer["choices"][0]["text"])
            except (KeyError, IndexError, TypeError) as error:
                raise SlimlmError(f"the teacher at {self.url} answered /v1/completions without choices[0].text: "
                                  f"{json.dumps(answer)[:200]}") from error
        return texts

    def _request(self, method: str, path: str, body: dict | None, timeout: float) -> dict:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        data = json.dumps(body).encode("utf-8") if body is not None else None
        request = urllib.request.Request(self.url + path, data=data, headers=headers, method=method)
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return json.loads(response.read().decode("utf-8"))
        except urllib.error.HTTPError as error:
            raise SlimlmError(f"HTTP {error.code} from {self.url}{path}: {error.read()[:200]!r}") from None
        except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as error:
            raise SlimlmError(f"{type(error).__name__}: {getattr(error, 'reason', error)}") from None
        except json.JSONDecodeError as error:
            raise SlimlmError(f"{self.url}{path} did not answer JSON ({error.msg})") from None

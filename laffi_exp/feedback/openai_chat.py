"""The synthetic pool from an LLM behind any OpenAI-compatible chat-completions endpoint (OpenAI, vLLM,
llama.cpp server, Ollama), through the official ``openai`` client and its own retries."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from urllib.parse import urlparse

from tqdm.auto import tqdm

from laffi_exp.core.errors import AnnotationError, ConfigError
from laffi_exp.feedback.llm import FewShotAnnotator, Request

log = logging.getLogger(__name__)

RETRIED_STATUS = (408, 409, 429)  # and every 5xx: what the openai client retries (``_should_retry``)


class OpenAIAnnotator(FewShotAnnotator):
    """Any OpenAI-compatible chat-completions endpoint (OpenAI, vLLM, llama.cpp server, Ollama); the
    prompt goes as one user message.

    The API key is read from the environment variable ``api_key_env`` only, and is never logged, cached
    or stored in a config; when it is unset the placeholder "EMPTY" is sent, which local servers accept.
    Up to ``max_concurrency`` requests are in flight at once, each with a ``timeout`` (seconds) per try.

    Retries are the openai client's own: 408, 409, 429, 5xx, timeouts and connection errors are retried
    with exponential back-off (0.5 s doubling to at most 8 s, less up to 25% jitter), or after the wait
    a ``Retry-After`` / ``Retry-After-Ms`` header asks for when that is between 0 and 120 s; a response
    whose Retry-After asks for longer (or that says ``x-should-retry: false``) is not retried, and
    other errors (401, 404, ...) fail at once. A 200 response the client cannot know is unusable (a
    body that is not JSON, no choices, empty content) is retried here, at once. Both kinds draw on one
    budget: at most ``max_retries`` retries (``max_retries + 1`` tries) per request. The first failure
    that is final stops the pass (requests in flight are cancelled, those done are kept in the cache)
    with one line naming the endpoint and what failed. ``check()`` (the pipeline calls it first) fails
    fast on an unreachable URL. The cache key holds the base URL, model, prompt, temperature and max
    tokens."""

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key_env: str = "OPENAI_API_KEY",
        temperature: float = 0.0,
        max_tokens: int = 96,
        k: int = 4,
        shot_seed: int = 0,
        shots_path: str | None = None,
        template: str | None = None,
        shot_template: str | None = None,
        max_concurrency: int = 4,
        max_retries: int = 5,
        timeout: float = 30.0,
        cache_dir: str | Path | None = None,
        show_gold: bool = True,
    ):
        import openai

        if not urlparse(str(base_url)).scheme.startswith("http"):
            raise ConfigError(f"feedback.synthetic.base_url: expected an http(s) URL, got {base_url!r}")
        if not model:
            raise ConfigError("feedback.synthetic.model: a model name is required")
        if isinstance(max_concurrency, bool) or not isinstance(max_concurrency, int) or max_concurrency < 1:
            raise ConfigError(f"feedback.synthetic.max_concurrency: expected an integer >= 1, got {max_concurrency!r}")
        if isinstance(max_retries, bool) or not isinstance(max_retries, int) or max_retries < 0:
            raise ConfigError(f"feedback.synthetic.max_retries: expected an integer >= 0, got {max_retries!r}")
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
            raise ConfigError(f"feedback.synthetic.timeout: expected a number of seconds > 0, got {timeout!r}")
        self.name = f"openai:{model}"
        super().__init__(k, shot_seed, shots_path, template, shot_template, show_gold, cache_dir)
        self.base_url = str(base_url).rstrip("/")
        self.model = model
        self.api_key_env = api_key_env
        self.temperature = temperature
        self.max_tokens = max_tokens
        self.max_concurrency = max_concurrency
        self.max_retries = max_retries
        self.timeout = float(timeout)
        self._key_set = bool(os.environ.get(api_key_env))
        # The key lives only in the clients. This one serves check() (one try, by design); each pass
        # has an AsyncOpenAI client of its own (see _async_client) that does the retrying.
        self.client = openai.OpenAI(
            base_url=self.base_url,
            api_key=os.environ.get(api_key_env) or "EMPTY",
            max_retries=0,
            timeout=self.timeout,
        )
        self._checked = False

    def _key_parts(self) -> dict:
        return dict(
            kind="openai",
            base_url=self.base_url,
            model=self.model,
            temperature=self.temperature,
            max_tokens=self.max_tokens,
        )

    def check(self) -> None:
        """Fail now, with one clear line, when the endpoint cannot be used: one GET /models without
        retries (any HTTP answer but 401/403 counts as reachable)."""
        import openai

        if not self._key_set:
            if urlparse(self.base_url).hostname == "api.openai.com":
                raise ConfigError(
                    f"feedback.synthetic.api_key_env: ${self.api_key_env} is not set; the OpenAI API needs a key "
                    f"(export {self.api_key_env}=...)"
                )
            log.info(
                "%s: $%s is not set: sending the placeholder key 'EMPTY' (local servers)", self.name, self.api_key_env
            )
        timeout = min(self.timeout, 10.0)
        try:
            listed = [m.id for m in self.client.models.list(timeout=timeout)]
        except openai.APIConnectionError as err:  # refused, DNS, TLS, or a timeout (APITimeoutError)
            reason = self._reason(err, timeout)
            raise ConfigError(f"feedback.synthetic.base_url={self.base_url}: cannot connect: {reason}") from None
        except (openai.AuthenticationError, openai.PermissionDeniedError) as err:
            raise ConfigError(
                f"feedback.synthetic.api_key_env: {self.base_url} refused the key from ${self.api_key_env} "
                f"(HTTP {err.status_code})"
            ) from None
        except (openai.APIStatusError, openai.APIResponseValidationError, ValueError):
            listed = []  # reachable; some servers have no /models, or list them in another shape
        if listed and self.model not in listed:
            shown = ", ".join(listed[:10])
            log.warning("%s: %s does not list model %r (it lists %s)", self.name, self.base_url, self.model, shown)
        self._checked = True

    def _async_client(self):
        """A client for one pass: its connections belong to the pass's event loop."""
        import openai

        return openai.AsyncOpenAI(
            base_url=self.base_url, api_key=self.client.api_key, max_retries=self.max_retries, timeout=self.timeout
        )

    def _complete(self, requests: Sequence[Request], progress: bool) -> Iterator[tuple[str, str]]:
        """The requests on an event loop of this pass's own, at most ``max_concurrency`` at once. On a
        failure or an interruption every other request is cancelled, in flight or waiting to retry."""
        if not self._checked:
            self.check()
        loop = asyncio.new_event_loop()
        client = self._async_client()
        limit = asyncio.Semaphore(self.max_concurrency)

        async def one(request: Request) -> tuple[str, str]:
            async with limit:
                return request.key, await self._request(client, request.prompt)

        tasks = [loop.create_task(one(r)) for r in requests]
        pending = set(tasks)
        try:
            with tqdm(total=len(requests), desc=f"annotate ({self.name})", disable=not progress, mininterval=2) as bar:
                while pending:
                    done, pending = loop.run_until_complete(asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED))
                    failed = [t for t in done if t.exception() is not None]
                    for task in done:
                        if task.exception() is None:  # keep what succeeded, even beside a failure
                            yield task.result()
                            bar.update()
                    if failed:
                        raise failed[0].exception()
        finally:
            for task in tasks:
                task.cancel()
            loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
            loop.run_until_complete(client.close())
            loop.close()

    async def _request(self, client, prompt: str) -> str:
        """One chat completion. The client retries what fails in transport or by status; a 200 whose
        content is unusable is retried here, within what is left of the same ``max_retries``."""
        import openai

        where = f"{self.name}: {self.base_url}/chat/completions"
        tries, last = 0, ""
        while tries <= self.max_retries:
            left = self.max_retries - tries
            try:
                raw = await client.with_options(max_retries=left).chat.completions.with_raw_response.create(
                    model=self.model,
                    messages=[{"role": "user", "content": prompt}],
                    temperature=self.temperature,
                    max_tokens=self.max_tokens,
                )
            except openai.APIStatusError as err:
                these = _tries(err.response.request)
                tries += these
                code = err.status_code
                text = str(err.message).removeprefix(f"Error code: {code}").lstrip(" -")  # the server's message
                what = f"HTTP {code}: {self._redact(_one_line(text))}" if text else f"HTTP {code}"
                retried = code in RETRIED_STATUS or code >= 500
                if not retried and tries == 1:
                    raise AnnotationError(f"{where} answered {what}") from None
                if retried and left > 0 and these == 1:  # the client declined to retry it
                    what += _declined(err.response.headers)
                raise AnnotationError(f"{where} failed {_times(tries)}; last: {what}") from None
            except openai.APIConnectionError as err:  # includes APITimeoutError
                tries += _tries(err.request)
                reason = self._reason(err, self.timeout)
                raise AnnotationError(f"{where} failed {_times(tries)}; last: {reason}") from None
            tries += raw.retries_taken + 1
            try:
                response = raw.parse()
            except (ValueError, openai.APIResponseValidationError) as err:  # a body that is not JSON
                last = f"malformed response: {type(err).__name__}"
            else:
                choices = getattr(response, "choices", None)
                if not choices:
                    last = "malformed response: no choices"
                elif not (choices[0].message and (choices[0].message.content or "").strip()):
                    last = "malformed response: empty message content"
                else:
                    return choices[0].message.content
            log.debug("%s: try %d: %s", self.name, tries, last)
        raise AnnotationError(f"{where} failed {_times(tries)}; last: {last}")

    def _reason(self, err: Exception, timeout: float) -> str:
        import openai

        if isinstance(err, openai.APITimeoutError):
            return f"no answer within {timeout:g} s (timeout)"
        cause = err.__cause__ or err
        return self._redact(_one_line(f"{type(cause).__name__}: {cause}"))

    def _redact(self, text: str) -> str:
        key = os.environ.get(self.api_key_env)
        return text.replace(key, "***") if key else text


def _tries(request) -> int:
    """Tries the openai client made for the request it last sent: it numbers its retries in the
    ``x-stainless-retry-count`` header of each one."""
    try:
        return int(request.headers.get("x-stainless-retry-count", 0)) + 1
    except (AttributeError, TypeError, ValueError):
        return 1


def _declined(headers) -> str:
    """Why the openai client did not retry a status that it otherwise retries."""
    if str(headers.get("x-should-retry", "")).lower() == "false":
        return " (not retried: the server sent x-should-retry: false)"
    for header, scale in (("retry-after-ms", 1000), ("retry-after", 1)):
        try:
            seconds = float(headers.get(header)) / scale
        except (TypeError, ValueError):
            continue
        if seconds > 120:
            return f" (not retried: Retry-After asks for {seconds:g} s, more than the 120 s the openai client waits)"
        return ""
    value = headers.get("retry-after")
    return f" (not retried: Retry-After: {value})" if value else ""


def _times(n: int) -> str:
    return "once" if n == 1 else f"{n} times"


def _one_line(text: str, limit: int = 300) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."

"""A minimal client of the Anthropic Messages API for natural-language tasks."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import httpx

from app.settings import Settings, mask_url_passwords

logger = logging.getLogger(__name__)

API_VERSION = "2023-06-01"


class LLMUnavailableError(Exception):
    """No API key is configured, so no model can be asked."""


class LLMRequestError(Exception):
    """The Messages API rejected the request or returned no text.

    Attributes:
        retryable: True for rate limits, overload and server errors.
    """

    def __init__(self, message: str, *, retryable: bool) -> None:
        super().__init__(message)
        self.retryable = retryable


@dataclass
class LLMReply:
    text: str
    model: str
    input_tokens: int | None
    output_tokens: int | None
    stop_reason: str | None


async def ask(
    settings: Settings, system: str, prompt: str, *, timeout: float = 120.0
) -> LLMReply:
    """Send one user message to the Messages API and return the reply text.

    `timeout` is httpx's limit in seconds on connecting and on each read; the
    caller limits the whole request.

    Raises:
        LLMUnavailableError: ANTHROPIC_API_KEY is not set.
        LLMRequestError: the API answered with an error or without text.
    """
    key = settings.anthropic_api_key
    if key is None or not key.get_secret_value():
        raise LLMUnavailableError(
            "a natural-language task needs an Anthropic API key: set "
            "ANTHROPIC_API_KEY for the sandbox worker, or give the task `code`, "
            "`command` or `action` instead"
        )
    url = settings.anthropic_base_url.rstrip("/") + "/v1/messages"
    # Messages show the URL without a password that the setting may carry.
    masked_url = mask_url_passwords(url)
    body = {
        "model": settings.anthropic_model,
        "max_tokens": settings.anthropic_max_tokens,
        "system": system,
        "messages": [{"role": "user", "content": prompt}],
    }
    headers = {
        "x-api-key": key.get_secret_value(),
        "anthropic-version": API_VERSION,
        "content-type": "application/json",
    }
    try:
        async with httpx.AsyncClient(timeout=httpx.Timeout(timeout)) as client:
            response = await client.post(url, json=body, headers=headers)
    except httpx.HTTPError as error:
        raise LLMRequestError(
            f"request to {masked_url} failed: {type(error).__name__}: "
            f"{mask_url_passwords(str(error))}",
            retryable=True,
        ) from error
    if response.status_code != 200:
        retryable = response.status_code in (408, 429, 529) or (
            response.status_code >= 500
        )
        raise LLMRequestError(
            f"Messages API at {masked_url} returned HTTP {response.status_code}: "
            f"{response.text[:500]}",
            retryable=retryable,
        )
    try:
        data = response.json()
    except ValueError:
        data = None
    if not isinstance(data, dict):
        # Another server at the base URL, such as a proxy's error page, may
        # respond with 200 too, and its body would otherwise fail with a bare
        # parser error that names neither the URL nor the setting.
        raise LLMRequestError(
            f"Messages API at {masked_url} returned HTTP 200 with a body that is not a "
            f"JSON object: {response.text[:200]!r}; check that "
            "NEXUS_ANTHROPIC_BASE_URL is the base URL of the Messages API",
            retryable=False,
        )
    content = data.get("content")
    blocks = content if isinstance(content, list) else []
    texts = [
        str(block.get("text", ""))
        for block in blocks
        if isinstance(block, dict) and block.get("type") == "text"
    ]
    if not texts:
        raise LLMRequestError(
            f"Messages API at {masked_url} returned no text block (stop_reason "
            f"{data.get('stop_reason')!r})",
            retryable=False,
        )
    usage = data.get("usage")
    if not isinstance(usage, dict):
        usage = {}
    return LLMReply(
        text="".join(texts),
        model=str(data.get("model", settings.anthropic_model)),
        input_tokens=usage.get("input_tokens"),
        output_tokens=usage.get("output_tokens"),
        stop_reason=data.get("stop_reason"),
    )

"""The live output stream of sandbox executions: each execution's stdout and
stderr, redacted as its result is, go to `execution_output` while the
program runs (see "Execution output" in docs/realtime.md)."""

from __future__ import annotations

import asyncio
import codecs
import json
import logging
from collections.abc import Iterable, Mapping

from app.realtime.output import OutputWriter
from app.sandbox.backend import RunOutput
from app.sandbox.runtime import redact, with_secret_lines

logger = logging.getLogger(__name__)

_STREAMS = ("stdout", "stderr")


class StreamRedactor:
    """Redacts secrets from text that arrives in pieces, as `redact` does on
    the whole text.

    A secret can span two pieces, so `push` holds back the end of the text
    where a secret may begin, and returns the rest redacted. The cut never
    splits an occurrence of a secret. So the pieces it returns, followed by
    `finish()`, equal `redact` of the whole text with the same list of
    secrets, except where one secret contains part of another's replacement
    (`********`).
    """

    def __init__(self, secrets: Iterable[str]) -> None:
        # Passed to `redact` as given: it replaces secrets of equal length in
        # its set's order, which depends on the order they were added. The
        # lines of multi-line secrets are included here too, so that the cut
        # never splits one of them either.
        self._all_secrets = with_secret_lines(secrets)
        # `redact` leaves values of fewer than 4 characters alone.
        self._secrets = [secret for secret in self._all_secrets if len(secret) >= 4]
        self._hold = max((len(secret) for secret in self._secrets), default=1) - 1
        self._withheld = ""

    def push(self, text: str) -> str:
        """Return the redacted text that is safe to emit now."""
        if not self._secrets:
            return text
        text = self._withheld + text
        cut = self._safe_cut(text)
        self._withheld = text[cut:]
        return redact(text[:cut], self._all_secrets)

    def finish(self, rest: str = "") -> str:
        """Return the redacted text still held back, followed by `rest`, the
        last text of the stream (which may end where the output limit cut a
        secret)."""
        withheld, self._withheld = self._withheld, ""
        return redact(withheld + rest, self._all_secrets)

    def _safe_cut(self, text: str) -> int:
        # Text after len - hold may be the start of a secret. Before that, the
        # cut moves back over every secret that it would split.
        cut = max(0, len(text) - self._hold)
        moved = True
        while moved and cut > 0:
            moved = False
            for secret in self._secrets:
                # An occurrence that starts before the cut and ends after it.
                start = text.find(
                    secret, max(0, cut - len(secret) + 1), cut - 1 + len(secret)
                )
                if start != -1 and start < cut:
                    cut = start
                    moved = True
        return cut


class ExecutionStream:
    """Sends one execution's output, redacted, to an `OutputWriter`.

    The chunks of an execution: a `start` event, the `stdout` and `stderr`
    text, and a final `exit` event. Each event's text is a JSON object.
    Nothing in here raises into the execution: a failure is logged with the
    sandbox id and ends the stream's output.
    """

    def __init__(
        self, writer: OutputWriter, secrets: Iterable[str], call_id: str | None
    ) -> None:
        self.writer = writer
        self.call_id = call_id
        secret_list = list(secrets)
        self._redactors = {name: StreamRedactor(secret_list) for name in _STREAMS}
        self._decoders = {
            name: codecs.getincrementaldecoder("utf-8")(errors="replace")
            for name in _STREAMS
        }
        # Characters of each stream decoded from live output so far.
        self._streamed = dict.fromkeys(_STREAMS, 0)
        self._started = False
        self._ended = False
        self._broken = False

    def start(self, run: int) -> None:
        """Add the `start` event; `run` counts the program's starts for this
        call, so above 1 when the call is made again."""
        self._started = True
        try:
            self._event("start", {"call_id": self.call_id, "run": run})
        except Exception:
            self._break("starting the output")

    def feed(self, stream: str, data: bytes) -> None:
        """Take output bytes of `stream` as the backend reads them."""
        if self._broken or self._ended:
            return
        try:
            text = self._decoders[stream].decode(data)
            self._streamed[stream] += len(text)
            self._add(stream, self._redactors[stream].push(text))
        except Exception:
            self._break("taking output")

    def finish(self, output: RunOutput, status: str) -> None:
        """Add the output that the stream has not had and the final `exit`
        event.

        That is the output of a backend without live output, and what a
        backend appends to the result: the truncation marker, a note on a
        failed runner.
        """
        if self._ended or not self._started:
            return
        try:
            for stream, whole in zip(
                _STREAMS, (output.stdout, output.stderr), strict=True
            ):
                tail = self._decoders[stream].decode(b"", final=True)
                streamed = self._streamed[stream] + len(tail)
                redactor = self._redactors[stream]
                self._add(stream, redactor.finish(tail + whole[streamed:]))
            self._ended = True
            exit_event = {
                "call_id": self.call_id,
                "status": status,
                "exit_code": output.exit_code,
                "execution_time": round(output.execution_time, 6),
                "stdout_dropped_bytes": output.stdout_dropped_bytes,
                "stderr_dropped_bytes": output.stderr_dropped_bytes,
            }
            self._event("exit", exit_event, final=True)
        except Exception:
            self._break("ending the output")

    def fail(self, error: BaseException) -> None:
        """End a started stream whose execution raised `error`: the `exit`
        event has status `cancelled` or `error` and the error's type."""
        if self._ended or not self._started:
            return
        try:
            for stream in _STREAMS:
                redactor = self._redactors[stream]
                tail = self._decoders[stream].decode(b"", final=True)
                self._add(stream, redactor.push(tail) + redactor.finish())
            self._ended = True
            cancelled = isinstance(error, asyncio.CancelledError)
            exit_event = {
                "call_id": self.call_id,
                "status": "cancelled" if cancelled else "error",
                "error": type(error).__name__,
            }
            self._event("exit", exit_event, final=True)
        except Exception:
            self._break("ending the output")

    async def close(self) -> None:
        """Submit what is buffered for writing, without waiting for it.

        Waiting for the last write cost each execution about 1.5 ms (see
        "Execution output" in docs/realtime.md), so the execution returns
        while its last chunks are written in order by the writer thread.
        """
        try:
            await self.writer.close(wait=False)
        except Exception:
            self._break("submitting the last chunks")

    def _add(self, stream: str, text: str) -> None:
        if text and not self._broken:
            self.writer.add(stream, text)

    def _event(
        self, stream: str, document: Mapping[str, object], final: bool = False
    ) -> None:
        if not self._broken:
            self.writer.add_event(stream, json.dumps(document), final=final)

    def _break(self, action: str) -> None:
        self._broken = True
        logger.warning(
            "output stream of sandbox %s (call %s) failed while %s; its later "
            "output is not streamed",
            self.writer.stream_id,
            self.call_id,
            action,
            exc_info=True,
        )

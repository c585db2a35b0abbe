"""A Server-Sent Events parser (the WHATWG event-stream format), fed raw bytes as they arrive.

Lines are split here rather than with ``StreamReader.readline``, whose 64 KiB line limit a job
view with a long history could exceed.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SseMessage:
    event: str  # "message" when the stream names none
    data: str
    id: str | None = None


class SseParser:
    def __init__(self) -> None:
        self._buffer = b""
        self._event = ""
        self._data: list[str] = []
        self.last_id: str | None = None
        self.retry_ms: int | None = None
        self.comments = 0  # ": ping" heartbeats seen

    def feed(self, chunk: bytes) -> list[SseMessage]:
        self._buffer += chunk
        *lines, self._buffer = self._buffer.split(b"\n")
        messages = []
        for raw in lines:
            message = self._line(raw.removesuffix(b"\r").decode("utf-8", errors="replace"))
            if message is not None:
                messages.append(message)
        return messages

    def _line(self, line: str) -> SseMessage | None:
        if not line:
            return self._dispatch()
        if line.startswith(":"):
            self.comments += 1
            return None
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value
        elif name == "id" and "\0" not in value:
            self.last_id = value
        elif name == "retry" and value.isdigit():
            self.retry_ms = int(value)
        return None

    def _dispatch(self) -> SseMessage | None:
        event, data, self._event, self._data = self._event, self._data, "", []
        if not data:
            return None
        return SseMessage(event=event or "message", data="\n".join(data), id=self.last_id)

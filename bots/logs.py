"""Logging: one line per event, JSON when LOG_FORMAT=json, with tokens and keys redacted."""

import json
import logging
import re
import sys

SECRET = re.compile(r"(xox[abpr]-[\w-]+|xapp-[\w-]+|sk-[\w-]{8,}|[MN][\w-]{23,}\.[\w-]{6}\.[\w-]{27,}|"
                    r"(?i:bearer|authorization|api[_-]?key|token)[\"']?\s*[:=]\s*[\"']?[^\s\"',]+)")


def redact(text: str) -> str:
    return SECRET.sub("[redacted]", text)


class RedactingFormatter(logging.Formatter):
    def format(self, record):
        return redact(super().format(record))


class JsonFormatter(logging.Formatter):
    def format(self, record):
        entry = {"time": self.formatTime(record), "level": record.levelname, "logger": record.name,
                 "message": record.getMessage()}
        if record.exc_info:
            entry["error"] = self.formatException(record.exc_info)
        return redact(json.dumps(entry, ensure_ascii=False))


def setup_logging(level: str = "INFO", fmt: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else
                         RedactingFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.captureWarnings(True)  # warnings become log lines too (JSON with LOG_FORMAT=json)
    for noisy in ("httpx", "httpx2", "httpcore", "httpcore2", "openai", "discord.gateway"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

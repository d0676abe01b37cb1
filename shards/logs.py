"""Log set-up shared by the launcher, router and shard processes: one line per event, as text
or (`--log-format json`) as one JSON object per line.

The launcher's choice reaches the processes it starts through `LOG_FORMAT_ENV`. A log call's
`extra={...}` fields become the JSON object's own keys (`request_id`, token counts, times), so
structured logs need no parsing of the message. What is logged never includes API keys or
prompt and output text: messages carry request ids and counts only.
"""

from __future__ import annotations

import json
import logging
import os
import time

LOG_FORMAT_ENV = "SHARDSERVE_LOG_FORMAT"
FORMATS = ("text", "json")
_TEXT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# What every LogRecord carries; anything else on a record came from `extra`.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        out.update((k, v) for k, v in vars(record).items() if k not in _STANDARD)
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def progress_bars() -> bool:
    """Whether long work may draw tqdm bars on stderr: not among JSON lines, where its
    start and end are logged instead."""
    return os.environ.get(LOG_FORMAT_ENV) != "json"


def configure(fmt: str | None = None) -> str:
    """Send INFO and above to stderr in `fmt` (default: what the launcher chose, else text).
    Returns the format, which children inherit."""
    fmt = fmt or os.environ.get(LOG_FORMAT_ENV) or "text"
    if fmt not in FORMATS:
        raise ValueError(f"log format {fmt!r}: expected one of {', '.join(FORMATS)}")
    os.environ[LOG_FORMAT_ENV] = fmt
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(_TEXT))
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    # httpx logs every request at INFO: a load generator's log would be nothing else
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.captureWarnings(True)  # library warnings become log lines too, in the same format
    return fmt

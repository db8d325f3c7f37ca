"""JSON log lines. Only whitelisted, non-patient fields are ever written."""

from __future__ import annotations

import json
import logging
import sys
import time

# Fields a log call may attach through ``extra=``. Nothing here can hold pixels, field
# values or filenames; anything else passed via ``extra`` is dropped.
SAFE_FIELDS = (
    "request_id",
    "model",
    "version",
    "status",
    "code",
    "outcome",
    "timing_ms",
    "batch_size",
    "providers",
    "load_ms",
    "instances",
    "max_batch_size",
    "depth",
    "path",
    "method",
    "models",
    "host",
    "port",
    "queue",
    "consumer",
    "entries",
    "deliveries",
    "waited_ms",
)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for name in SAFE_FIELDS:
            if hasattr(record, name):
                entry[name] = getattr(record, name)
        if record.exc_info and record.exc_info[0] is not None:
            # Type and location only: exception messages can quote user input.
            tb = record.exc_info[2]
            while tb is not None and tb.tb_next is not None:
                tb = tb.tb_next
            where = f"{tb.tb_frame.f_code.co_filename}:{tb.tb_lineno}" if tb else "?"
            entry["exc_type"] = record.exc_info[0].__name__
            entry["exc_where"] = where
        return json.dumps(entry, default=str)


def configure_logging(level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # uvicorn's access log prints query strings; the service writes its own request log.
    logging.getLogger("uvicorn.access").disabled = True

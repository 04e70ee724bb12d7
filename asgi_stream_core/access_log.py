"""What the gateway sets in its server's log, whatever command started it: no
query string in uvicorn's access log (prompts travel in `?prompt=` and
`?messages=`, keys in `?access_token=`), and a client the reader dropped on
purpose logged as a normal ending, not as an ERROR.

`install()` adds two filters to uvicorn's loggers when the app is made, so
`python -m asgi_stream`, the image's CMD and any `uvicorn asgi_stream:app`
line get them, with uvicorn's log config or the operator's own (filters on a
logger survive `logging.config.dictConfig`). Under other servers the filters
sit on loggers nobody uses."""

from __future__ import annotations

import logging
import re
from contextvars import ContextVar

ACCESS_LOGGER, ERROR_LOGGER = "uvicorn.access", "uvicorn.error"
MAX_LOGGED_PATH = 200  # characters of a path kept in a log line: a 100 KB path makes no 100 KB line

# Set in the request's task by a reader that may leave its response unfinished on purpose (a client
# that stopped reading, or fell behind the held events): uvicorn logs that return from the same task.
_unfinished_on_purpose: ContextVar[bool] = ContextVar("unfinished_on_purpose", default=False)
UNFINISHED = "ASGI callable returned without completing response."
DROPPED = "a stream's client was dropped (it took no bytes for SEND_TIMEOUT_SECONDS, or fell behind the held events)"


def may_leave_response_unfinished() -> None:
    """Called in the request's own task by the reader: an unfinished response is a drop, not a bug."""
    _unfinished_on_purpose.set(True)


def path_only(target: str) -> str:
    """A request target without its query, cut to MAX_LOGGED_PATH characters."""
    return target.split("?", 1)[0][:MAX_LOGGED_PATH]


class NoQuery(logging.Filter):
    """uvicorn logs `'%s - "%s %s HTTP/%s" %d' % (client, method, path?query, version, status)`:
    each string argument that is a path or holds a `?` loses its query (the
    others are the client, the method and the version); a message formatted
    beforehand loses every `?...` up to a space."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(path_only(a) if isinstance(a, str) and ("?" in a or a.startswith("/")) else a for a in record.args)
        if isinstance(record.msg, str) and "?" in record.msg:
            record.msg = re.sub(r"\?\S*", "", record.msg)
        return True


class DroppedIsInfo(logging.Filter):
    """uvicorn's ERROR for a response left unfinished becomes an INFO line
    when the reader left it so on purpose (any other stays an ERROR)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.msg != UNFINISHED or not _unfinished_on_purpose.get():
            return True
        record.msg, record.levelno, record.levelname = DROPPED, logging.INFO, "INFO"
        return logging.getLogger(record.name).isEnabledFor(logging.INFO)


def install() -> None:
    """Add the filters, once per process."""
    for name, kind in ((ACCESS_LOGGER, NoQuery), (ERROR_LOGGER, DroppedIsInfo)):
        logger = logging.getLogger(name)
        if not any(isinstance(f, kind) for f in logger.filters):
            logger.addFilter(kind())

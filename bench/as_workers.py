#!/usr/bin/env python3
"""A stand-in for the interpreter the shared harness starts the project with
(`--project-python`), so that its `--project-workers N` runs `WORKERS=N python
-m asgi_stream` (a socket per worker, asgi_stream_core/workers.py) instead of
`uvicorn --workers N` (one shared socket), on the host and port it was given.
The interpreter that really runs the project is $PROJECT_PYTHON:

    PROJECT_PYTHON=$PWD/.venv/bin/python ../shared/bench/run fanout --targets project \\
        --project . --project-workers 2 --project-python "$PWD/bench/as_workers.py" \\
        --project-env REDIS_URL=redis://127.0.0.1:6379

Any other command line goes to $PROJECT_PYTHON as it is. `python -m asgi_stream`
picks its own loop and HTTP protocol (uvloop when installed; our
asgi_stream_core.connections:HttpProtocol over httptools), as a user running it would.
"""

import os
import sys

python = os.environ["PROJECT_PYTHON"]
argv = sys.argv[1:]
if argv[:3] == ["-m", "uvicorn", "asgi_stream:app"]:

    def option(flag: str, default: str) -> str:
        return argv[argv.index(flag) + 1] if flag in argv else default

    os.chdir(option("--app-dir", "."))
    os.environ.update(HOST=option("--host", "127.0.0.1"), PORT=option("--port", "8000"), WORKERS=option("--workers", "1"))
    os.execv(python, [python, "-m", "asgi_stream"])
os.execv(python, [python, *argv])

# asgi-stream in a small image: a slim Python base, the project installed (not
# editable) into a virtualenv built in a throw-away stage, run by uvicorn as a
# non-root user. Build: docker build -t asgi-stream .
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
WORKDIR /src
# The whole project (.dockerignore leaves out tests and tooling): `pip install .`
# installs every module pyproject.toml names, so a new module needs no new line
# here; the extras are the clients of the shared stores (USAGE_DB=postgresql://..., REDIS_URL).
COPY . .
# index.html is read from beside the installed module (asgi_stream_core.services.INDEX_FILE);
# -I: import the installed module, not /src/asgi_stream.py. The venv gets no pip of its own.
RUN python -m venv --without-pip /venv \
 && python -m pip --python /venv/bin/python install --no-cache-dir --no-compile '.[postgres,redis]' \
 && /venv/bin/python -I -c "import shutil; from asgi_stream_core.services import INDEX_FILE; shutil.copy('index.html', INDEX_FILE)"

FROM ${PYTHON_IMAGE}
RUN useradd --system --uid 10001 --home-dir /app --shell /usr/sbin/nologin app \
 && mkdir -p /data /app && chown app /data
COPY --from=build /venv /venv
WORKDIR /app

# Configuration: environment variables only, read once at startup; the app has
# its own defaults (README, "Configuration"), so the image sets only what the
# image itself needs. Secrets are passed at run time, never baked in.
ENV PATH=/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    USAGE_DB=/data/usage.db
VOLUME /data
USER app
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=5s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4)"]
# --timeout-graceful-shutdown: without it uvicorn waits forever for open
# streams on SIGTERM; with it, open streams get `error` (shutdown) + `done`.
# This 5 s plus the app's wait for the last ledger rows (5 s) must stay well
# below the orchestrator's stop grace (docker-compose.yml: 30 s; docker's default is 10 s).
# --http asgi_stream_core.connections:HttpProtocol: uvicorn's own, plus a deadline for each request head
# (HEADER_TIMEOUT_SECONDS) and a bound on connections (MAX_CONNECTIONS): idle and slow connections cannot
# use up the process's files (README, "Deployment"). The access log never holds the query: the app sees to it.
CMD ["uvicorn", "asgi_stream:app", "--host", "0.0.0.0", "--port", "8000", "--timeout-graceful-shutdown", "5", "--no-server-header", \
     "--http", "asgi_stream_core.connections:HttpProtocol"]

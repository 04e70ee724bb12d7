# asgi-stream in a small image: a slim Python base, the runtime dependencies
# in a virtualenv built in a throw-away stage, the app as plain files, run by
# uvicorn as a non-root user. Build: docker build -t asgi-stream .
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
WORKDIR /src
COPY pyproject.toml .
# Only [project] dependencies (no test extras), read from pyproject.toml so the
# list lives in one place; the venv gets no pip of its own.
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" > requirements.txt \
 && python -m venv --without-pip /venv \
 && python -m pip --python /venv/bin/python install --no-cache-dir --no-compile -r requirements.txt

FROM ${PYTHON_IMAGE}
RUN useradd --system --uid 10001 --home-dir /app --shell /usr/sbin/nologin app \
 && mkdir -p /data && chown app /data
COPY --from=build /venv /venv
WORKDIR /app
COPY asgi_stream.py openai_api.py sse.py ledger.py index.html ./
COPY stores ./stores
COPY providers ./providers

# Configuration: environment variables only, read once at startup (an invalid
# value stops startup, naming the variable). Defaults shown; see README.
# Secrets are passed at run time, never baked in: OPENAI_API_KEY,
# OPENAI_BASE_URL, API_KEYS (name:key,...).
ENV PATH=/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    DEFAULT_BACKEND="" \
    DEFAULT_MODEL="" \
    MAX_TOKENS=1024 \
    MAX_TOKENS_LIMIT=8192 \
    CORS_ORIGINS="" \
    MAX_BODY_BYTES=1048576 \
    MAX_STREAMS=1000 \
    MAX_STREAMS_PER_KEY=100 \
    CONNECT_TIMEOUT_SECONDS=10 \
    FIRST_TOKEN_TIMEOUT_SECONDS=120 \
    IDLE_TIMEOUT_SECONDS=60 \
    TOTAL_TIMEOUT_SECONDS=600 \
    HEARTBEAT_SECONDS=15 \
    RESUME_GRACE_SECONDS=5 \
    RESUME_TTL_SECONDS=60 \
    USAGE_DB=/data/usage.db
VOLUME /data
USER app
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=5s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4)"]
# --timeout-graceful-shutdown: without it uvicorn waits forever for open
# streams on SIGTERM; with it, open streams get `error` (shutdown) + `done`.
# Keep it below the orchestrator's stop grace (docker: 10 s).
CMD ["uvicorn", "asgi_stream:app", "--host", "0.0.0.0", "--port", "8000", "--timeout-graceful-shutdown", "5", "--no-server-header"]

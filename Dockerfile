# One image for both programs: telemetry-streamer (the default) and telemetry-broker serve.
#   docker build -t telemetry-streamer:0.1.0 .
#   docker run --rm -p 8080:8080 telemetry-streamer:0.1.0
#   docker run --rm --entrypoint telemetry-broker telemetry-streamer:0.1.0 serve --host=0.0.0.0

FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY streamer/ streamer/
COPY broker/ broker/
COPY common/ common/
# the project and every dependency as wheels, so the final stage installs offline and compiles nothing
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.11-slim
RUN useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin telemetry
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir --no-index --find-links=/wheels /wheels/telemetry_streamer-*.whl \
    && rm -rf /wheels
COPY data/gpu_metrics.csv /data/gpu_metrics.csv
# the data directory (--persistence): the program's own, 0700, never under /tmp
RUN install -d -o telemetry -g telemetry -m 0700 /var/lib/telemetry
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    TELEMETRY_BROKER_PERSISTENCE_DIR=/var/lib/telemetry \
    TELEMETRY_STREAMER_PERSISTENCE_DIR=/var/lib/telemetry
USER 10001
EXPOSE 5555 8080
HEALTHCHECK --interval=15s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=2)"]
# exec form: the program is PID 1 and receives SIGTERM itself, and drains (tested as PID 1)
ENTRYPOINT ["telemetry-streamer"]
CMD ["--csv=/data/gpu_metrics.csv", "--workers=5", "--rate=10.0", "--http-host=0.0.0.0"]

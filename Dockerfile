# syntax=docker/dockerfile:1
# Build stage: durable-rules builds from source, so wheels are made where a compiler exists.
FROM python:3.11-slim AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml README.md ./
COPY controller ./controller
COPY connectors ./connectors
COPY rules ./rules
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

# Runtime stage: slim image, no compiler, non-root user.
FROM python:3.11-slim
RUN useradd --create-home --uid 10001 convctl \
 && mkdir -p /data \
 && chown convctl:convctl /data
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir --no-index --find-links=/wheels convctl \
 && rm -rf /wheels
USER convctl
WORKDIR /home/convctl
# The prod profile refuses to start without CONVCTL_SESSION_SECRET and CONVCTL_ADMIN_TOKEN.
# Mount the analysts' rules and point CONVCTL_RULES_DIR at them, or keep the packaged
# default rules.
ENV CONVCTL_PROFILE=prod \
    CONVCTL_HOST=0.0.0.0 \
    CONVCTL_PORT=8080 \
    CONVCTL_DATA_DIR=/data \
    PYTHONUNBUFFERED=1
VOLUME ["/data"]
EXPOSE 8080
HEALTHCHECK --interval=15s --timeout=3s --start-period=20s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('CONVCTL_PORT', '8080'), timeout=2)"]
ENTRYPOINT ["convctl"]
CMD ["serve"]

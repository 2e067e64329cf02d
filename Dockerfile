# Minimal image: the whole of nerve plus mosquitto, running `nerve up` (a later issue hardens it:
# non-root, slimmer, arm64). Build: docker build -t nerve .   Run: docker run --rm -p 1883:1883 nerve
FROM python:3.11-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends mosquitto mosquitto-clients \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /opt/nerve
COPY pyproject.toml README.md ./
COPY runtime runtime
COPY edge edge
COPY bridge bridge
COPY agents agents
RUN python -m venv .venv \
    && .venv/bin/pip install --no-cache-dir ./runtime[nats,site] ./edge ./bridge ./agents .
ENV PATH=/opt/nerve/.venv/bin:$PATH
ENTRYPOINT ["nerve"]
CMD ["up", "--data-dir", "/var/lib/nerve", "--device", "container-01"]

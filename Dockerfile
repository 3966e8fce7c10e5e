# imagegate with the local SDXL backend on a CUDA GPU.
#   docker build -t imagegate .
#   docker run --gpus all -p 8000:8000 -v $HOME/.cache/huggingface:/home/imagegate/.cache/huggingface \
#     -v $PWD/routes.yaml:/app/routes.yaml imagegate
# The PyTorch image brings CUDA, cuDNN and a CUDA build of torch; the `local` extra adds diffusers and
# transformers on top without replacing torch (its requirement is a range the base image satisfies).
FROM pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    # compiled kernels survive restarts when this path is a mounted volume
    TORCHINDUCTOR_CACHE_DIR=/home/imagegate/.cache/inductor

RUN useradd --create-home --uid 10001 imagegate
WORKDIR /app

# Dependencies first, so editing the code does not re-install them.
COPY pyproject.toml README.md ./
COPY gateway/__init__.py gateway/__init__.py
COPY backends/__init__.py backends/__init__.py
RUN pip install ".[local]" && pip uninstall -y imagegate

COPY gateway gateway
COPY backends backends
COPY routes.yaml routes.yaml
RUN pip install --no-deps . && rm -rf build

USER imagegate
EXPOSE 8000
# Liveness only: /healthz is cheap and answers while models load; use /readyz for a readiness probe.
HEALTHCHECK --interval=15s --timeout=3s --start-period=30s --retries=3 \
  CMD python -c "import urllib.request,sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2).status == 200 else 1)"
CMD ["imagegate", "serve", "--config", "/app/routes.yaml", "--host", "0.0.0.0", "--port", "8000"]

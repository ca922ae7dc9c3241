# The worker image: PyTorch with CUDA, one container per GPU.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY lrfinder ./lrfinder
COPY api ./api
COPY worker ./worker
RUN pip install --no-cache-dir torch==2.14.1 torchvision==0.29.1 \
    && pip install --no-cache-dir '.[service,engine]'
USER nobody

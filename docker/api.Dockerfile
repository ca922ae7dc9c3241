# The API image: FastAPI, Celery client and Redis, without torch.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY lrfinder ./lrfinder
COPY api ./api
COPY worker ./worker
RUN pip install --no-cache-dir '.[service]'
USER nobody
EXPOSE 8000

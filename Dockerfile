# One image for the server and the worker. PyPI's Linux torch wheel carries CUDA, so the
# same image serves pages (never touching torch) and runs GPU work.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml constraints.txt README.md alembic.ini ./
COPY backend backend
COPY workers workers
COPY frontend frontend
COPY migrations migrations
RUN pip install --no-cache-dir torch==2.13.0 \
 && pip install --no-cache-dir -c constraints.txt -e ".[postgres]" \
 && pip install --no-cache-dir --no-deps sae-dashboard==0.8.0
ENV RA_DATA_DIR=/data
VOLUME /data

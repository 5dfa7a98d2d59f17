# One image for the server and the worker. TORCH_INDEX picks the wheel flavour: the CPU
# index for the server-only image, a CUDA index for GPU workers.
FROM python:3.11-slim
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu124
WORKDIR /app
COPY pyproject.toml constraints.txt README.md alembic.ini ./
COPY backend backend
COPY workers workers
COPY frontend frontend
COPY migrations migrations
RUN pip install --no-cache-dir --index-url "$TORCH_INDEX" torch==2.13.0 \
 && pip install --no-cache-dir -c constraints.txt -e ".[postgres]" \
 && pip install --no-cache-dir --no-deps sae-dashboard==0.8.0
ENV RA_DATA_DIR=/data
VOLUME /data

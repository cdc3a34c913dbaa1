# syntax=docker/dockerfile:1
# Pioneer images, entrypoint `pioneer`. Targets:
#   cpu  CPU torch: front-ends, migrations, CPU workers   docker build --target cpu -t pioneer:cpu .
#   gpu  CUDA torch: GPU workers                          docker build --target gpu -t pioneer:gpu .
# Both run as the unprivileged user `pioneer` (uid 10001) with PIONEER_DATA_DIR=/data.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-base-ubuntu24.04
ARG TORCH_VERSION=2.13.0
ARG TORCH_CUDA_INDEX=https://download.pytorch.org/whl/cu128

# ---- The project as a wheel, and its requirements (torch apart) as a list ---------------------------------------
FROM ${PYTHON_IMAGE} AS wheel
WORKDIR /src
COPY pyproject.toml README.md ./
RUN python -c "import tomllib; deps = tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']; \
print('\n'.join(d for d in deps if not d.startswith('torch')))" > /requirements.txt
COPY pioneer_model pioneer_model
COPY worker worker
COPY bots bots
COPY migrations migrations
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

# ---- CPU: a virtualenv with CPU torch, the requirements, then the project --------------------------------------
FROM ${PYTHON_IMAGE} AS cpu-venv
ARG TORCH_VERSION
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN pip install torch==${TORCH_VERSION} --index-url https://download.pytorch.org/whl/cpu
COPY --from=wheel /requirements.txt /requirements.txt
RUN pip install -r /requirements.txt
COPY --from=wheel /wheels /wheels
RUN pip install --no-deps /wheels/*.whl

FROM ${PYTHON_IMAGE} AS cpu
RUN useradd --create-home --uid 10001 --shell /usr/sbin/nologin pioneer && install -d -o pioneer /data
COPY --from=cpu-venv /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 PIONEER_DATA_DIR=/data
USER pioneer
WORKDIR /home/pioneer
VOLUME /data
EXPOSE 9100
ENTRYPOINT ["pioneer"]
CMD ["--help"]

# ---- GPU: the same on a CUDA base; the torch wheel brings its own CUDA libraries, the host its driver ----------
FROM ${CUDA_IMAGE} AS gpu-base
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*

FROM gpu-base AS gpu-venv
ARG TORCH_VERSION
ARG TORCH_CUDA_INDEX
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN pip install torch==${TORCH_VERSION} --index-url ${TORCH_CUDA_INDEX}
COPY --from=wheel /requirements.txt /requirements.txt
RUN pip install -r /requirements.txt
COPY --from=wheel /wheels /wheels
RUN pip install --no-deps /wheels/*.whl

FROM gpu-base AS gpu
RUN useradd --create-home --uid 10001 --shell /usr/sbin/nologin pioneer && install -d -o pioneer /data
COPY --from=gpu-venv /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 PIONEER_DATA_DIR=/data
USER pioneer
WORKDIR /home/pioneer
VOLUME /data
EXPOSE 9100
ENTRYPOINT ["pioneer"]
CMD ["--help"]

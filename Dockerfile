# RD Studio. CPU by default:      docker build -t rd-studio .
# NVIDIA GPUs (CUDA torch wheels): docker build --build-arg DEVICE=cuda -t rd-studio:cuda .
# Run (this machine only):  docker run -p 127.0.0.1:8501:8501 -e RD_STUDIO_PASSWORD=choose-one rd-studio
# (add --gpus all for the CUDA image). Inside the container the server listens beyond loopback,
# so the studio asks for $RD_STUDIO_PASSWORD and refuses to open without one; publish on
# 0.0.0.0 (-p 8501:8501) only to serve other machines: docs/reliability.md.
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}

ARG DEVICE=cpu
ENV PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /opt/rd-studio
COPY requirements.txt ./
# PyPI's torch wheels carry CUDA; the CPU image takes the smaller CPU-only build of the same version.
RUN if [ "$DEVICE" = "cpu" ]; then \
        pip install --extra-index-url https://download.pytorch.org/whl/cpu -r requirements.txt; \
    else \
        pip install -r requirements.txt; \
    fi

COPY pyproject.toml README.md ./
COPY .streamlit ./.streamlit
COPY rd ./rd
COPY app ./app
COPY checkpoints ./checkpoints

RUN useradd --create-home --uid 1000 rd
USER rd
ENV RD_HOME=/home/rd/.local/share/rd-studio
# The built-in dataset is generated at build time so the first page opens at once.
RUN python -c "from rd.data.synthetic import ensure_builtin_dataset; ensure_builtin_dataset()"

EXPOSE 8501
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8501/_stcore/health', timeout=4)"
# The README's start command; inside a container the server must listen beyond localhost, so
# app/access.py asks for $RD_STUDIO_PASSWORD (set it with docker run -e).
CMD ["streamlit", "run", "app/main.py", "--server.address=0.0.0.0", "--server.port=8501"]

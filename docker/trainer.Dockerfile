# CUDA + DALI image for the trainer ranks. Build from the repo root:
#   docker build -f docker/trainer.Dockerfile -t datasvc-trainer .
FROM pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential libjpeg-turbo8-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /opt/datasvc
COPY pyproject.toml setup.py README.md ./
COPY datasvc datasvc
COPY converters converters
COPY trainer trainer
COPY benchmarks benchmarks
RUN pip install --no-cache-dir '.[dali]'
ENTRYPOINT ["torchrun"]
CMD ["--nproc_per_node", "gpu", "-m", "trainer", "train", "--config", "trainer/configs/seed001_resnet50.yaml"]

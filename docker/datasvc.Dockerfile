# CPU image for `datasvc serve` (and convert / verify / bench). Build from the repo root:
#   docker build -f docker/datasvc.Dockerfile -t datasvc .
FROM python:3.11-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential libjpeg62-turbo-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /opt/datasvc
COPY pyproject.toml setup.py README.md ./
COPY datasvc datasvc
COPY converters converters
COPY trainer trainer
COPY benchmarks benchmarks
# The base install only: packs, conversion, the server and the CPU decoders, no torch (the
# service runs no models; tests/test_install.py checks this set serves a converted pack).
RUN DATASVC_REQUIRE_EXTENSION=1 pip install --no-cache-dir . \
 && python -c "import datasvc.decode as d; print('crop-aware decoder:', d.CROP_DECODER)"
RUN useradd --create-home datasvc
USER datasvc
EXPOSE 5555
ENTRYPOINT ["datasvc"]
CMD ["serve", "--help"]

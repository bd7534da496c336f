# podlens image: build with `docker build -t podlens:0.1.0 .` (or podman/buildah).
# Both stages use the same base, pinned to Python 3.11 on Debian 12; pin it by
# digest too (python:3.11-slim-bookworm@sha256:...) once you mirror it.

# Stage 1: fetch the model with the project's own script, which checks every
# file's SHA-256, so a corrupt or tampered download fails the build.
FROM python:3.11-slim-bookworm AS model
COPY model/fetch.py /src/fetch.py
RUN python /src/fetch.py --model-dir /model

# Stage 2: the runtime, with only the runtime requirements and the verified model.
FROM python:3.11-slim-bookworm
# HOST 0.0.0.0: the server's default (loopback) is unreachable from outside a container.
# PYTHONDONTWRITEBYTECODE: the root filesystem is read-only in Kubernetes.
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOST=0.0.0.0 \
    PORT=8080
WORKDIR /app
COPY requirements.txt .
# Into the image's own Python, as root: the image is the isolation a venv would give.
RUN pip install --no-cache-dir --root-user-action=ignore -r requirements.txt
# Files stay root-owned: the server only reads them, so a compromised
# process cannot rewrite its own code or model.
COPY --from=model /model/ model/
COPY server.py .
COPY static/ static/
# Served at GET /openapi.yaml.
COPY openapi.yaml .
# Add further runtime files here as they land (and allow them in .dockerignore).
# A numeric user, so Kubernetes can verify runAsNonRoot without /etc/passwd.
USER 10001
EXPOSE 8080
CMD ["python", "server.py"]

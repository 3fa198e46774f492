# The serving image: onnxruntime + the HTTP server, no torch. Mount a bundle at /models/bundle
# (compose.yaml does) and publish port 8000.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md requirements-serve.txt ./
COPY src ./src
RUN pip install -r requirements-serve.txt && rm -rf /src/build

# never run the server as root
RUN useradd --create-home --uid 10001 lensforge
USER lensforge
WORKDIR /home/lensforge

EXPOSE 8000
# slim has no curl: probe /healthz with the standard library
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import urllib.request, sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2).status != 200)"]

# 0.0.0.0 inside the container only: what is reachable from outside is decided by `ports:` / `-p`.
# SIGTERM (docker stop) drains: readiness 503, accepted requests finish, exit 0 within --grace.
STOPSIGNAL SIGTERM
CMD ["lensforge", "serve", "/models/bundle", "--host", "0.0.0.0", "--port", "8000"]

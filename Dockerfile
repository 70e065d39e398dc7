# One step of the tutorial as a container image, installed from the lock, run as a user
# without privileges, with a health check through the gRPC health service.
#
#   docker build --build-arg STEP=step-19_rest_gateway -t grpc-mastery-greeter .
#
# The server needs a token (GREETER_AUTH_TOKEN) from step 05 on, and certs/ (made by the
# step's ./gen_certs.sh, mounted read-only) from step 06 on: docker-compose.yml does both.
FROM python:3.11-slim

ARG STEP=step-19_rest_gateway
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
# Only the services' packages (requirements-runtime.lock: the versions of requirements.lock,
# without the development tools), every file checked against the lock's hashes.
COPY requirements-runtime.lock ./
RUN pip install --require-hashes --requirement requirements-runtime.lock

RUN useradd --create-home --uid 10001 greeter
COPY tools/healthcheck.py /app/healthcheck.py
COPY ${STEP}/ /app/step/
WORKDIR /app/step
USER greeter

# Inside a container the servers must listen on every interface; the ports are published
# (or not) by whoever runs it. The Logger (step 10 on) runs from the same image:
# `python logger_server.py` (docker-compose.yml).
ENV GREETER_HOST=0.0.0.0 \
    GREETER_METRICS_HOST=0.0.0.0 \
    LOGGER_HOST=0.0.0.0 \
    LOGGER_METRICS_HOST=0.0.0.0
EXPOSE 50051 9464 50052 9465

HEALTHCHECK --interval=10s --timeout=5s --start-period=10s --retries=3 \
    CMD ["python", "/app/healthcheck.py"]
# SIGTERM from `docker stop` reaches the server directly (no shell in between): it reports
# NOT_SERVING, drains and exits 0.
CMD ["python", "server.py"]

# One step of the tutorial as a container image: the step's servers on a slim Python, run as
# a user without privileges, with a health check through the gRPC health service.
#
#   docker build --build-arg STEP=step-21_request_validation -t grpc-mastery-greeter:step-21 .
#
# Two stages (step 20's README, "The image"): `build` installs the services' packages into a
# virtual env; the image copies that env alone onto a clean base, without pip's caches, the
# lock or the code generator (grpcio-tools is a development tool: the generated code is
# checked in). The base is pinned by tag; CI records the digest of every image it pushes.
#
# The server needs a token (GREETER_AUTH_TOKEN) from step 05 on, and certs/ (made by the
# step's ./gen_certs.sh, mounted read-only) from step 06 on: docker-compose.yml and the
# Kubernetes manifests (step 20) do both.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
# Only the services' packages (requirements-runtime.lock: the versions of requirements.lock,
# without the development tools), every file checked against the lock's hashes.
COPY requirements-runtime.lock /tmp/
RUN python -m venv /venv \
    && /venv/bin/pip install --no-cache-dir --disable-pip-version-check \
        --require-hashes --requirement /tmp/requirements-runtime.lock

FROM ${PYTHON_IMAGE}
ARG STEP=step-21_request_validation
# Nothing is written at run time (Kubernetes mounts the root file system read-only): the
# step's bytecode is compiled below, the packages' was at install.
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PATH=/venv/bin:$PATH

RUN useradd --uid 10001 --user-group --no-create-home --shell /usr/sbin/nologin greeter
COPY --from=build /venv /venv
COPY tools/healthcheck.py /app/healthcheck.py
COPY ${STEP}/ /app/step/
RUN python -m compileall -q /app/step /app/healthcheck.py
WORKDIR /app/step
USER 10001:10001

# Inside a container the servers must listen on every interface; the ports are published
# (or not) by whoever runs it. The Logger (step 10 on) runs from the same image:
# `python logger_server.py` (docker-compose.yml, deploy/k8s/logger.yaml).
ENV GREETER_HOST=0.0.0.0 \
    GREETER_METRICS_HOST=0.0.0.0 \
    LOGGER_HOST=0.0.0.0 \
    LOGGER_METRICS_HOST=0.0.0.0
EXPOSE 50051 9464 50052 9465

# Docker's own check; Kubernetes ignores it and asks the probe port instead (step 20).
HEALTHCHECK --interval=10s --timeout=5s --start-period=10s --retries=3 \
    CMD ["python", "/app/healthcheck.py"]
# SIGTERM from `docker stop` reaches the server directly (no shell in between): it reports
# NOT_SERVING, drains and exits 0.
CMD ["python", "server.py"]

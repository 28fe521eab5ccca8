# gatehouse in a container. Build from the repository's root (docs/deploy.md):
#
#   docker build -t gatehouse .                      the server, with an empty /project to mount or bake in
#   docker build -t gatehouse-demo --target demo .   the same with the demo shop (examples/shop) in /project
#
# A project of your own, baked in (the way docs/deploy.md recommends for Kubernetes):
#
#   FROM gatehouse
#   COPY --chown=10001:10001 . /project/
#
# or mounted:  docker run -v "$PWD/my-project:/project" ... gatehouse
#
# Stage 1 builds gatehouse's wheel and the wheels of everything it needs; the final stage installs them into a
# venv from those files alone (no index, no compiler), so it holds no build tools, no wheel files and no cache.

ARG PYTHON_IMAGE=python:3.11.13-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
RUN pip install "build==1.2.2.post1"
COPY pyproject.toml README.md ./
COPY src ./src
COPY examples ./examples
# The wheel carries examples/shop (pyproject's force-include), as `gatehouse demo` needs it.
RUN python -m build --wheel --outdir /dist . \
 && pip wheel --wheel-dir /wheels "$(find /dist -name 'gatehouse-*.whl')[events]"


FROM ${PYTHON_IMAGE} AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/gatehouse/bin:$PATH
# One user, no login shell, fixed numeric ids (Kubernetes' runAsNonRoot can only check a number).
RUN groupadd --system --gid 10001 gatehouse \
 && useradd --system --uid 10001 --gid 10001 --home-dir /home/gatehouse --create-home \
            --shell /usr/sbin/nologin gatehouse
# [events] brings the NATS and RabbitMQ sinks of the relay (Redis Streams and webhooks need nothing more).
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    python -m venv /opt/gatehouse \
 && /opt/gatehouse/bin/pip install --no-index --find-links=/wheels "gatehouse[events]" \
 && /opt/gatehouse/bin/gatehouse --version
# /project holds the project (gatehouse.toml, contracts/, migrations/, logic/, contracts.lock); gatehouse writes
# only under /project/.gatehouse (the audit spool used while the database is away), so the rest may be read-only.
RUN mkdir -p /project/.gatehouse \
 && chown -R 10001:10001 /project
WORKDIR /project
# Fixed inside the container, whatever the project's gatehouse.toml says, so EXPOSE, the HEALTHCHECK and the
# orchestrator's probes agree: both ports on every interface of the container. Publish only the data port.
# No embedded PostgreSQL in a container: a database whose URL was not passed is an error naming the variable,
# not a database created inside the container and lost with it.
ENV GATEHOUSE_PROJECT=/project \
    GATEHOUSE_EMBEDDED=off \
    GATEHOUSE_SERVER__HOST=0.0.0.0 \
    GATEHOUSE_SERVER__PORT=3000 \
    GATEHOUSE_SERVER__ADMIN_HOST=0.0.0.0 \
    GATEHOUSE_SERVER__ADMIN_PORT=3001
EXPOSE 3000 3001
USER 10001:10001
# Healthy = /ready answers 200 on the admin port (every database reachable and applied); no curl in the image.
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/ready' % os.environ.get('GATEHOUSE_SERVER__ADMIN_PORT', '3001'), timeout=2)"]
# SIGTERM (docker stop, Kubernetes) drains: no new connections, requests being answered finish within
# [server] shutdown_grace_s, the audit is flushed. Give the container longer than that to stop.
STOPSIGNAL SIGTERM
ENTRYPOINT ["gatehouse"]
CMD ["serve"]


# The demo shop as the project: what deploy/compose.yaml and the Helm chart's default values run.
FROM base AS demo
COPY --chown=10001:10001 examples/shop/ /project/


# The default target (last stage): the server with an empty /project.
FROM base AS runtime

# Debian's Go `serf` (agent and CLI), the seed's serf_1, for docker-compose.yml:
#
#   docker build -t amb-serf-demo/serf -f docker/serf.Dockerfile docker
#
# EXPOSE as ctlc/serf had, so `--link serf_1:serf_1` gives SERF_1_PORT_7946_TCP. The RPC port
# (7373) is not exposed: the agent listens on its own loopback (`serf agent`'s default), so only
# `docker exec … serf members` reaches it.
ARG DEBIAN_IMAGE=debian:bookworm-slim
FROM ${DEBIAN_IMAGE}
RUN set -eu; apt-get update; \
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends serf; \
    rm -rf /var/lib/apt/lists/*
EXPOSE 7946/tcp 7946/udp
ENTRYPOINT ["serf"]
CMD ["agent"]

# One image with every storagetier binary.
#   docker build -t storagetier .
#   docker run --rm storagetier online-archive check-config
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bins \
 && mkdir /out \
 && cp target/release/online-archive target/release/online-nearline \
       target/release/project-ingest target/release/crash-router \
       target/release/snapshot-status target/release/event-forwarder /out/ \
 && cp target/release/echo /out/storagetier-echo

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates curl \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --home-dir /var/lib/storagetier storagetier \
 && mkdir -p /var/lib/storagetier \
 && chown storagetier /var/lib/storagetier
COPY --from=build /out/ /usr/local/bin/
# Only the config files: a key or certificate left beside them stays out of the image.
COPY config/*.toml /etc/storagetier/
# The data directory comes from the config (`[storage] data_dir`, /var/lib/storagetier in
# prod.toml), not from an environment variable here, which would override every file.
# Embedded SQLite databases and local stores live there: mount a volume on it.
ENV STORAGETIER_CONFIG_DIR=/etc/storagetier \
    APP_ENV=prod
USER storagetier
WORKDIR /var/lib/storagetier
VOLUME /var/lib/storagetier
# Each container runs one service: `docker run storagetier online-archive run`. The
# framework's example service is `storagetier-echo`, so it never shadows the shell's `echo`.
CMD ["storagetier-echo", "--help"]

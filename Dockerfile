# Builds the operator image: a static-enough release binary on a distroless, non-root base.
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src src
RUN cargo build --release --locked --bin statekeeper

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/release/statekeeper /usr/local/bin/statekeeper
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/statekeeper"]
CMD ["operator"]

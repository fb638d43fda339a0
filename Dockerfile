# The revdial image: `revdial server ...` / `revdial agent ...` (deploy/kubernetes/).
#   docker build -t revdial:0.1.0 .
FROM python:3.12-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY src ./src
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.12-slim
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
# An unprivileged user (the manifests also run as 65532).
USER 65532:65532
ENTRYPOINT ["revdial"]
CMD ["--help"]

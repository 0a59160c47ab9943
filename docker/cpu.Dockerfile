# slimdeploy runtime image for CPUs: check, run, bench and inspect bundles with ONNX Runtime.
# No torch: the runtime side never imports it (tests/test_no_torch.py proves this).
#
#   docker build -f docker/cpu.Dockerfile -t slimdeploy:cpu .
#   docker run --rm -v $PWD/bundles:/bundles slimdeploy:cpu check /bundles/spconv_resnet20
ARG PYTHON_VERSION=3.11
FROM python:${PYTHON_VERSION}-slim

ARG ONNXRUNTIME_VERSION=1.23.2
WORKDIR /opt/slimdeploy
COPY pyproject.toml README.md ./
COPY slimdeploy ./slimdeploy
# The base install is the runtime side: numpy, onnx, onnxruntime, typer, rich, pydantic.
RUN pip install --no-cache-dir "onnxruntime==${ONNXRUNTIME_VERSION}" . \
    && python -c "import slimdeploy.cli, sys; assert 'torch' not in sys.modules"

ENTRYPOINT ["slimdeploy"]
CMD ["--help"]

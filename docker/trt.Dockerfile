# slimdeploy TensorRT image for x86 NVIDIA GPUs: build a bundle's engines on this GPU, then
# check, run and bench them. No torch: TensorRT's own Python bindings (from the NGC image, not
# a second TensorRT from pip), cuda-python for device buffers, ONNX Runtime for CPU checks.
#
#   docker build -f docker/trt.Dockerfile -t slimdeploy:trt .
#   docker build -f docker/trt.Dockerfile --build-arg TENSORRT_TAG=25.01 -t slimdeploy:trt-25.01 .
#   docker build -f docker/trt.Dockerfile --build-arg TENSORRT_TAG=25.10 --build-arg CUDA_PYTHON_VERSION=13.0 -t slimdeploy:trt-25.10 .
#   docker run --rm --gpus all -v $PWD/bundles:/bundles slimdeploy:trt build /bundles/skipnet38
#   docker run --rm --gpus all -v $PWD/bundles:/bundles slimdeploy:trt check /bundles/skipnet38 --device tensorrt
#
# Engines only run on the TensorRT version and GPU that built them: build with the image (and on
# the GPU) that will serve. slimdeploy supports TensorRT 10.3 to 11.x; 24.08 ships TensorRT 10.3,
# the version of JetPack 6, so engines and timing behave alike on both (pick a newer tag on NGC
# for a newer TensorRT). CUDA_PYTHON_VERSION must follow the tag's CUDA major version: the
# default 12.6 for tags up to 25.07 (CUDA 12), 13.0 from 25.08 on (those tags are CUDA 13).
ARG TENSORRT_TAG=24.08
FROM nvcr.io/nvidia/tensorrt:${TENSORRT_TAG}-py3

# cuda-python must match the image's CUDA major version: 12.x up to 25.07, 13.x from 25.08.
ARG CUDA_PYTHON_VERSION=12.6
ARG ONNXRUNTIME_VERSION=1.23.2
WORKDIR /opt/slimdeploy
COPY pyproject.toml README.md ./
COPY slimdeploy ./slimdeploy
# The base install is the runtime side (numpy, onnx, onnxruntime, typer, rich, pydantic); not the [trt]
# extra, whose tensorrt requirement would pull a second TensorRT over the image's.
RUN python3 -m pip install --no-cache-dir \
        "onnxruntime==${ONNXRUNTIME_VERSION}" "cuda-python~=${CUDA_PYTHON_VERSION}.0" . \
    && python3 -c "import importlib.util as u, sys, slimdeploy.cli; assert u.find_spec('tensorrt'), 'no TensorRT bindings'; assert 'torch' not in sys.modules"

# (TensorRT is looked up, not imported, above: its libraries need the GPU driver, which the
# NVIDIA container runtime mounts only at `docker run`.)
ENTRYPOINT ["slimdeploy"]
CMD ["--help"]

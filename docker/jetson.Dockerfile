# slimdeploy image for Jetson (Orin) on JetPack 6 (L4T r36.x): TensorRT 10.3, CUDA 12.6,
# Python 3.10 from the base image. Builds a bundle's engines on the Jetson, then checks, runs
# and benches them. No torch.
#
#   docker build -f docker/jetson.Dockerfile -t slimdeploy:jetson .          # on the Jetson
#   docker run --rm --runtime nvidia -v $PWD/bundles:/bundles slimdeploy:jetson build /bundles/skipnet38
#
# Every version is a build argument. BASE_IMAGE may also be the smaller runtime image
# nvcr.io/nvidia/l4t-tensorrt:r10.3.0-runtime; JetPack 7 (Thor: CUDA 13, TensorRT 10.13+) needs
# its own base tag from NGC and --build-arg CUDA_PYTHON_VERSION=13.0.
ARG BASE_IMAGE=nvcr.io/nvidia/l4t-jetpack:r36.4.0
FROM ${BASE_IMAGE}

# cuda-python must match the base image's CUDA major version: 12.x on JetPack 6, 13.x on JetPack 7.
ARG CUDA_PYTHON_VERSION=12.6
ARG ONNXRUNTIME_VERSION=1.23.2
# TensorRT 10.3's Python bindings predate NumPy 2: keep NumPy 1.x beside them.
ARG NUMPY_VERSION=1.26.4
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3-pip \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /opt/slimdeploy
COPY pyproject.toml README.md ./
COPY slimdeploy ./slimdeploy
# The runtime side plus cuda-python; TensorRT comes with JetPack (python3-libnvinfer), so the
# [trt] extra is not installed over it.
RUN python3 -m pip install --no-cache-dir \
        "numpy==${NUMPY_VERSION}" "onnxruntime==${ONNXRUNTIME_VERSION}" "cuda-python~=${CUDA_PYTHON_VERSION}.0" . \
    && python3 -c "import importlib.util as u, sys, slimdeploy.cli; assert u.find_spec('tensorrt'), 'no TensorRT bindings'; assert 'torch' not in sys.modules"

# (TensorRT is looked up, not imported, above: its libraries need the GPU driver, which the
# NVIDIA container runtime mounts only at `docker run`.)
ENTRYPOINT ["slimdeploy"]
CMD ["--help"]

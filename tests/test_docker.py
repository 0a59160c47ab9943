"""The images' recipes (docker is not run here): every version a build argument, the base images
of docs/tensorrt-facts.md "Containers", entrypoint ``slimdeploy``, and no torch installed."""

from __future__ import annotations

import re

import pytest

from tests.conftest import REPO

DOCKERFILES = {
    "cpu.Dockerfile": "python:",
    "trt.Dockerfile": "nvcr.io/nvidia/tensorrt:",
    "jetson.Dockerfile": "nvcr.io/nvidia/l4t-jetpack:r36.",
}


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_dockerfile_pins_versions_as_arguments(name: str) -> None:
    text = (REPO / "docker" / name).read_text()
    args = dict(re.findall(r"^ARG (\w+)=(\S+)$", text, re.M))
    (base,) = re.findall(r"^FROM (\S+)$", text, re.M)
    # The base image is chosen by a build argument whose default is the documented image.
    used = re.findall(r"\$\{(\w+)\}", base)
    assert used and all(arg in args for arg in used), base
    resolved = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], base)
    assert resolved.startswith(DOCKERFILES[name]) and "latest" not in resolved
    # Every ${VAR} in a RUN line is a declared argument with a default.
    for var in re.findall(r"\$\{(\w+)\}", text):
        assert var in args, f"{name}: {var} is not an ARG with a default"
    assert 'ENTRYPOINT ["slimdeploy"]' in text
    install = " ".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    assert not re.search(r"pip install[^&]*\btorch\b", install), "the edge images carry no torch"
    assert "slimdeploy[trt]" not in install  # TensorRT comes with the base image, never a second one


def test_trt_images_default_to_tensorrt_10_3() -> None:
    trt = (REPO / "docker" / "trt.Dockerfile").read_text()
    assert "ARG TENSORRT_TAG=24.08" in trt and "-py3" in trt
    jetson = (REPO / "docker" / "jetson.Dockerfile").read_text()
    assert "ARG BASE_IMAGE=nvcr.io/nvidia/l4t-jetpack:r36.4.0" in jetson
    assert "cuda-python~=${CUDA_PYTHON_VERSION}.0" in jetson and "ARG CUDA_PYTHON_VERSION=12.6" in jetson

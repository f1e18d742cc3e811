"""The gpu overlay's worker image (`make image-cuda`: deploy/Dockerfile with TORCH_VARIANT=cuda),
run on a machine without a GPU (`make image-cuda-test`).

The image named by ``$BATCHSERVE_CUDA_IMAGE`` (the make target builds it and sets it; without
it these tests are skipped) holds PyPI's CUDA build of torch 2.13.0; in a container given no GPU,
``benchmarks/gpu_check.py`` says there is no CUDA, naming that build, and exits 0; with the CPU
standing in (``--device cpu``) every check runs on that build of torch inside the image and the
``image`` check says so.  What it cannot check here is the GPU itself: on a GPU host, run the
script inside the image with the GPU given to the container (docs/kubernetes.md).  Containers
run with ``--rm``, in the foreground, and are gone when each test ends.
"""

from __future__ import annotations

import json
import os

import pytest

from tests.deploy.test_image import Engine

IMAGE = os.environ.get("BATCHSERVE_CUDA_IMAGE")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not IMAGE, reason="the CUDA worker image's test: `make image-cuda-test` builds the image and runs it"),
]
PYTHON = "/opt/venv/bin/python"


@pytest.fixture(scope="module")
def engine() -> Engine:
    engine = Engine()
    if engine("image", "inspect", IMAGE, check=False).returncode != 0:
        pytest.fail(f"no image {IMAGE}: build it with `make image-cuda`")
    return engine


def python(engine: Engine, *args: str, timeout: float = 120):
    """``python ARGS`` in a container of the image: no network, no GPU, removed when it exits."""
    return engine("run", "--rm", "--network", "none", "--no-healthcheck", *engine.run_options, "--entrypoint", PYTHON, IMAGE, *args,
                  timeout=timeout, check=False)


def test_the_image_holds_the_cuda_build_of_torch(engine):
    done = python(engine, "-c", "import json, os, torch; print(json.dumps([torch.__version__, torch.version.cuda, "
                  "torch.cuda.is_available(), os.environ.get('BATCHSERVE_TORCH_VARIANT')]))")
    assert done.returncode == 0, done.stderr
    version, cuda, available, variant = json.loads(done.stdout.strip().splitlines()[-1])
    assert version.startswith("2.13.0") and "+cpu" not in version, version
    assert cuda is not None, "torch built without CUDA"
    assert available is False  # no GPU given to the container (none on a machine like this one)
    assert variant == "cuda"


def test_gpu_check_without_a_gpu_names_the_cuda_build_and_exits_0(engine):
    done = python(engine, "benchmarks/gpu_check.py")
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 1, done.stdout
    assert lines[0].startswith("SKIP all: no CUDA on this host (torch 2.13.0"), lines[0]
    assert "(CUDA 1" in lines[0] and "sees no CUDA device; inside the cuda image)" in lines[0], lines[0]


def test_every_check_runs_inside_the_image_with_the_cpu_standing_in(engine):
    """The GPU check's own code on the image's torch: spawned workers, the embeddings model, the
    generation engine; the ``image`` line says the checks ran in the CUDA worker image."""
    done = python(engine, "benchmarks/gpu_check.py", "--device", "cpu", timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.strip().splitlines()
    statuses = {line.split()[1].rstrip(":"): line.split()[0] for line in lines[:-1]}
    assert statuses == {
        "cuda": "SKIP", "process-spawn": "PASS", "process-embeddings": "PASS", "embeddings": "PASS",
        "generation": "PASS", "two-gpus": "SKIP", "image": "PASS",
    }, done.stdout
    image = next(line for line in lines if line.startswith("PASS image:"))
    assert "gpu overlay's worker image (torch 2.13.0" in image and "CUDA None" not in image, image
    assert lines[-1].startswith("PASS gpu-check on cpu: 6 of 6"), done.stdout

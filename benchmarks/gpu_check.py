"""The GPU path, checked on a CUDA host in a few minutes (`make gpu-check`).

No GPU has run batchserve's CUDA code before this script: it exercises each place where the
code treats a GPU differently from the CPU, and prints one line per check, PASS, FAIL or SKIP
with its reason:

* ``cuda``: torch sees CUDA devices; asking for one past the last is refused by name
  (:func:`batchserve.devices.check_devices`).
* ``process-spawn``: the process backend with two workers on ``cuda:0``: it spawns (CUDA does
  not survive fork), each worker gets ``CUDA_VISIBLE_DEVICES=0`` and ``BATCHSERVE_DEVICE=cuda:0``
  before it imports torch, computes on its GPU, and both answer.
* ``process-embeddings``: the bundled embeddings model through that backend (two spawned
  workers on ``cuda:0``, ``runtime=auto`` picks torch there): equal to the torch runtime on the
  CPU within 1e-3.
* ``embeddings``: the torch encoder runtime on CUDA in this process, equal to the CPU within 1e-3.
* ``generation``: the torch causal-LM runtime on CUDA under the generation engine (six greedy
  prompts joining one running batch: prefill, row-cache merges, decode): the same tokens as on
  the CPU.
* ``two-gpus``: with two or more GPUs, ``--devices cuda:0,cuda:1``: worker 0 on the first, worker
  1 on the second (each sees its own as ``cuda:0``; told apart by PCI bus id); else SKIP.
* ``image``: whether these checks ran inside the gpu overlay's worker image
  (``localhost/batchserve-cuda``, ``make image-cuda``: ``BATCHSERVE_TORCH_VARIANT=cuda`` is set
  there) on its CUDA build of torch: PASS there, naming torch's version and CUDA version; SKIP
  elsewhere, with the command that runs this script inside that image.

On a host without CUDA it says so, naming the torch build it found, and exits 0.  ``--device cpu`` runs the same checks with
the CPU standing in for the GPU (the comparisons are then CPU against CPU): how the checks
themselves are tested on a machine without a GPU.  Exit status: 1 if any check failed.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import os
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))  # this checkout's batchserve, even where another one is installed

TOLERANCE = 1e-3
TEXTS = [
    "The cat sits on the mat.",
    "A GPU runs many small matrix products at once.",
    "Dynamic batching groups requests that arrive close together.",
    "Kubernetes restarts a pod whose liveness probe fails.",
    "short",
    "A much longer sentence, written so that the batch holds rows of different lengths and the padding matters.",
]
PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, there was a little",
    "Here is a list of fruits: apple, banana,",
    "The quick brown fox",
    "In 1969, the first man to walk on the moon was",
]
GENERATED_TOKENS = 8


class Check:
    """One line of the report."""

    def __init__(self, name: str, status: str, reason: str):
        self.name, self.status, self.reason = name, status, reason

    def line(self) -> str:
        return f"{self.status:4} {self.name}: {self.reason}"


class DeviceProbe:
    """A model for the process backend: each output says which process computed it, what it was
    given, and where its tensor lived (a sum computed on the worker's torch device)."""

    def load(self) -> None:
        import torch

        from batchserve.devices import pick_torch_device

        self.torch = torch
        self.device = pick_torch_device()
        self.bus_id = _bus_id(torch, self.device)

    def predict(self, batch: list) -> list:
        time.sleep(0.02)  # concurrent batches spread over the workers
        values = self.torch.tensor([float(x) for x in batch], device=self.device)
        doubled = (values * 2).cpu().tolist()
        return [
            {
                "pid": os.getpid(),
                "slot": os.environ.get("BATCHSERVE_WORKER"),
                "cuda_visible": os.environ.get("CUDA_VISIBLE_DEVICES"),
                "placed": os.environ.get("BATCHSERVE_DEVICE"),
                "tensor_device": str(values.device),
                "bus_id": self.bus_id,
                "x": x,
                "doubled": value,
            }
            for x, value in zip(batch, doubled)
        ]


def _bus_id(torch, device: str) -> str | None:
    """The PCI bus id of the GPU ``device`` is in this process (None on the CPU)."""
    if not device.startswith("cuda"):
        return None
    properties = torch.cuda.get_device_properties(torch.device(device))
    return f"{properties.pci_domain_id:04x}:{properties.pci_bus_id:02x}:{properties.pci_device_id:02x}"


# --------------------------------------------------------------------------- checks


def check_cuda(device: str) -> Check:
    import torch

    from batchserve.devices import check_devices

    if device == "cpu":
        return Check("cuda", "SKIP", "--device cpu: the CPU stands in for the GPU")
    count = torch.cuda.device_count()
    names = ", ".join(f"cuda:{index} {torch.cuda.get_device_name(index)}" for index in range(count))
    try:
        check_devices(f"cuda:{count}")
    except ValueError as error:
        refused = f"cuda:{count} refused ({error})"
    else:
        return Check("cuda", "FAIL", f"cuda:{count} was accepted on a host with {count} GPUs")
    return Check("cuda", "PASS", f"torch {torch.__version__}, CUDA {torch.version.cuda}: {names}; {refused}")


def _process_batcher(spec, workers: int, devices: str, start_method: str | None = None):
    from batchserve import Batcher
    from batchserve.backends import ProcessBackend

    backend = ProcessBackend(spec, workers=workers, devices=devices, start_method=start_method, start_timeout=240)
    return Batcher(backend, max_batch_size=4, max_latency=0.005)


def _spread(batcher, want_pids: int, calls: int = 64) -> list[dict]:
    """Concurrent one-item calls until ``want_pids`` processes have answered (five rounds at most)."""
    outputs: list[dict] = []
    for _ in range(5):
        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            outputs += [out[0] for out in pool.map(lambda i: batcher.predict([i]), range(calls))]
        if len({out["pid"] for out in outputs}) >= want_pids:
            break
    return outputs


def check_process_spawn(device: str) -> Check:
    from batchserve.model import ModelSpec

    placed = "cuda:0" if device == "cuda" else "cpu"
    start_method = None if device == "cuda" else "spawn"  # a GPU must spawn by default; the CPU is told to
    with _process_batcher(ModelSpec(DeviceProbe), 2, placed, start_method) as batcher:
        method = batcher.backend.start_method
        outputs = _spread(batcher, want_pids=2)
    problems = []
    if method != "spawn":
        problems.append(f"start method {method}, not spawn")
    pids = {out["pid"] for out in outputs}
    if len(pids) != 2:
        problems.append(f"{len(pids)} worker(s) answered, not 2")
    wrong = [out for out in outputs if out["doubled"] != 2 * out["x"]]
    if wrong:
        problems.append(f"{len(wrong)} wrong outputs, e.g. {wrong[0]}")
    want_visible, want_tensor = ("0", "cuda:0") if device == "cuda" else ("", "cpu")
    seen = {(out["cuda_visible"], out["placed"], out["tensor_device"]) for out in outputs}
    if seen != {(want_visible, placed, want_tensor)}:
        problems.append(f"workers saw (CUDA_VISIBLE_DEVICES, BATCHSERVE_DEVICE, tensor device) {sorted(seen)}, "
                        f"not {(want_visible, placed, want_tensor)}")
    if problems:
        return Check("process-spawn", "FAIL", "; ".join(problems))
    return Check("process-spawn", "PASS", f"2 workers on {placed} ({method}), pids {sorted(pids)}, "
                 f"{len(outputs)} calls answered on {want_tensor}")


def _embed_reference(texts: list[str]):
    """The torch encoder runtime on the CPU: what every GPU result is compared with."""
    from batchserve.apps.embeddings import EmbeddingModel

    model = EmbeddingModel(device="cpu", runtime="torch")
    model.load()
    return [vector for vector, _ in model.predict(texts)], model


def _max_difference(vectors, reference) -> float:
    import numpy as np

    return float(max(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)).max() for a, b in zip(vectors, reference)))


def check_embeddings(device: str) -> Check:
    from batchserve.apps.embeddings import EmbeddingModel

    reference, _ = _embed_reference(TEXTS)
    model = EmbeddingModel(device=device, runtime="torch")
    model.load()
    facts = model.describe()
    vectors = [vector for vector, _ in model.predict(TEXTS)]
    difference = _max_difference(vectors, reference)
    if not facts.get("device", "").startswith(device):
        return Check("embeddings", "FAIL", f"the model runs on {facts.get('device')}, not {device}")
    if len(vectors) != len(TEXTS) or difference > TOLERANCE:
        return Check("embeddings", "FAIL", f"{len(vectors)} vectors, max |difference| to the CPU {difference:.2e} (> {TOLERANCE})")
    return Check("embeddings", "PASS", f"torch runtime on {facts['device']}: {len(vectors)} vectors, "
                 f"max |difference| to the CPU {difference:.2e} (<= {TOLERANCE})")


def check_process_embeddings(device: str) -> Check:
    from batchserve.model import ModelSpec

    placed = "cuda:0" if device == "cuda" else "cpu"
    reference, _ = _embed_reference(TEXTS)
    # runtime: "auto" on a GPU (it must pick torch there); told "torch" when the CPU stands in
    kwargs = {} if device == "cuda" else {"runtime": "torch"}
    spec = ModelSpec("batchserve.apps.embeddings:EmbeddingModel", kwargs=kwargs)
    with _process_batcher(spec, 2, placed, None if device == "cuda" else "spawn") as batcher:
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            answered = list(pool.map(lambda text: batcher.predict([text])[0], TEXTS * 4))
        facts = batcher.backend.describe() if hasattr(batcher.backend, "describe") else {}
        pids = batcher.backend.worker_pids()
    vectors = [vector for vector, _ in answered]
    difference = _max_difference(vectors, reference * 4)
    if len(pids) != 2 or difference > TOLERANCE:
        return Check("process-embeddings", "FAIL", f"{len(pids)} workers, max |difference| to the CPU {difference:.2e}; {facts}")
    return Check("process-embeddings", "PASS", f"2 spawned workers on {placed}: {len(vectors)} vectors, "
                 f"max |difference| to the CPU {difference:.2e} (<= {TOLERANCE})")


async def _generate(lm) -> list[list[int]]:
    from batchserve.generation import GenerationEngine, SamplingParams

    engine = GenerationEngine(lm)
    engine.start()
    try:
        greedy = SamplingParams(max_tokens=GENERATED_TOKENS, temperature=0, ignore_eos=True)
        requests = []
        for prompt in PROMPTS:  # each joins the running batch a step or two after the one before
            requests.append(engine.submit(engine.encode(prompt), greedy, timeout=120))
            await asyncio.sleep(0.01)
        results = await asyncio.gather(*(request.result() for request in requests))
    finally:
        engine.stop()
    return [result.choices[0].token_ids for result in results]


def check_generation(device: str) -> Check:
    from batchserve.runtimes.torch.lm import TorchCausalLM

    reference = asyncio.run(_generate(TorchCausalLM.load(device="cpu")))
    lm = TorchCausalLM.load(device=device)
    on_device = str(lm.device)
    tokens = asyncio.run(_generate(lm))
    if not on_device.startswith(device):
        return Check("generation", "FAIL", f"the model runs on {on_device}, not {device}")
    same = sum(a == b for a, b in zip(tokens, reference))
    if same != len(PROMPTS):
        firsts = [next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None) for a, b in zip(tokens, reference)]
        return Check("generation", "FAIL", f"{same}/{len(PROMPTS)} prompts gave the CPU's greedy tokens "
                     f"(first differing position per prompt: {firsts})")
    return Check("generation", "PASS", f"torch runtime on {on_device} under the engine: {len(PROMPTS)} prompts x "
                 f"{GENERATED_TOKENS} greedy tokens, the same as on the CPU")


def check_two_gpus(device: str) -> Check:
    import torch

    from batchserve.model import ModelSpec

    if device != "cuda":
        return Check("two-gpus", "SKIP", "--device cpu")
    count = torch.cuda.device_count()
    if count < 2:
        return Check("two-gpus", "SKIP", f"{count} GPU on this host; --devices cuda:0,cuda:1 needs two")
    expected = {str(index): _bus_id(torch, f"cuda:{index}") for index in (0, 1)}
    with _process_batcher(ModelSpec(DeviceProbe), 2, "cuda:0,cuda:1") as batcher:
        outputs = _spread(batcher, want_pids=2)
    seen = {(out["slot"], out["cuda_visible"], out["placed"], out["bus_id"]) for out in outputs}
    wanted = {("0", "0", "cuda:0", expected["0"]), ("1", "1", "cuda:1", expected["1"])}
    if seen != wanted:
        return Check("two-gpus", "FAIL", f"workers saw (slot, CUDA_VISIBLE_DEVICES, device, bus id) {sorted(seen)}, not {sorted(wanted)}")
    return Check("two-gpus", "PASS", f"worker 0 on cuda:0 ({expected['0']}), worker 1 on cuda:1 ({expected['1']})")


#: the gpu overlay's worker image (`make image-cuda`), and how this script runs inside it on a GPU host
CUDA_IMAGE = "localhost/batchserve-cuda:latest"
IMAGE_COMMAND = (f"podman run --rm --device nvidia.com/gpu=all --entrypoint /opt/venv/bin/python {CUDA_IMAGE} "
                 "benchmarks/gpu_check.py")
#: set by deploy/Dockerfile: which torch build the image holds (cpu or cuda); unset outside the image
VARIANT_ENV = "BATCHSERVE_TORCH_VARIANT"


def check_image(device: str = "cuda") -> Check:
    import torch

    variant = os.environ.get(VARIANT_ENV)
    build = f"torch {torch.__version__}, CUDA {torch.version.cuda}"
    if variant == "cuda":
        if torch.version.cuda is None:
            return Check("image", "FAIL", f"the CUDA worker image holds {build}")
        return Check("image", "PASS", f"these checks ran inside the gpu overlay's worker image ({build}, on {device})")
    if variant:
        return Check("image", "SKIP", f"inside the {variant} image ({build}); the gpu overlay's workers run {CUDA_IMAGE}: "
                     f"`make image-cuda`, then {IMAGE_COMMAND}")
    return Check("image", "SKIP", f"run on the host ({build}), not in the gpu overlay's worker image: `make image-cuda`, "
                 f"then {IMAGE_COMMAND}")


def where() -> str:
    """Where this script runs: the host, or an image of deploy/Dockerfile and its torch build."""
    variant = os.environ.get(VARIANT_ENV)
    return f"inside the {variant} image" if variant else "on the host"


CHECKS = [check_cuda, check_process_spawn, check_process_embeddings, check_embeddings, check_generation, check_two_gpus]


def run_checks(device: str, names: list[str] | None = None) -> list[Check]:
    """Each check in turn (or those named), printing its line as it ends; an exception is a FAIL."""
    results = []
    for check in CHECKS:
        name = check.__name__.removeprefix("check_").replace("_", "-")
        if names and name not in names:
            continue
        started = time.monotonic()
        try:
            result = check(device)
        except Exception as error:  # a check that crashes is a failed check, reported as one line
            where = traceback.extract_tb(error.__traceback__)[-1]
            result = Check(name, "FAIL", f"{type(error).__name__}: {error} ({Path(where.filename).name}:{where.lineno})")
        result.reason += f" [{time.monotonic() - started:.1f} s]"
        print(result.line(), flush=True)
        results.append(result)
    return results


def cuda_absent_reason() -> str | None:
    """Why this host cannot run the checks on a GPU, or None when it can."""
    try:
        import torch
    except ImportError:
        return "torch is not installed"
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is built without CUDA"
    if not torch.cuda.is_available():
        return f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no CUDA device"
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda", help="cpu: the CPU stands in for the GPU")
    parser.add_argument("--only", nargs="*", help="run only these checks (cuda, process-spawn, ...)")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    if args.device == "cuda":
        absent = cuda_absent_reason()
        if absent is not None:
            print(f"SKIP all: no CUDA on this host ({absent}; {where()}); nothing checked")
            return 0
    started = time.monotonic()
    results = run_checks(args.device, args.only)
    failed = [result.name for result in results if result.status == "FAIL"]
    if not args.only:
        image = check_image(args.device)
        print(image.line())
        if image.status == "FAIL":
            failed.append(image.name)
    print(f"{'FAIL' if failed else 'PASS'} gpu-check on {args.device}: {len(results) - len(failed)} of {len(results)} "
          f"checks without failure{' (failed: ' + ', '.join(failed) + ')' if failed else ''} in {time.monotonic() - started:.0f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

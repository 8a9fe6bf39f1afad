"""Test setup shared by every file.

* Without a GPU, Triton kernels run under the CPU interpreter: ``TRITON_INTERPRET=1`` must be set
  before triton is first imported by any test module, so it is set here, at collection start.
* Marker ``cuda``: the test needs a GPU and is skipped cleanly without one (still collected).
* ``emulated_build`` / ``emu``: the CUDA kernels of csrc/ compiled for the CPU against the emulator
  of csrc/emulate/, once per test session (a process can register the library only once);
  ``fused_backend``: each backend's name for the modules' ``backend=``, the cuda one emulated on CPU.
"""
import os
import shutil

import pytest
import torch

HAS_GPU = torch.cuda.is_available()
if not HAS_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import preact_fused.cuda as cuda_backend  # noqa: E402 (after TRITON_INTERPRET)
from preact_fused import backend as backends  # noqa: E402

DEVICE = "cuda" if HAS_GPU else "cpu"
CSRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "csrc")


@pytest.fixture
def one_thread():
    """Tiny tensors: one intra-op thread is faster, and immune to a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def exact_cudnn():
    """On a GPU the reference runs cuDNN: exact fp32 there too (PyTorch enables TF32 convs by default)."""
    previous = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = previous


def pytest_collection_modifyitems(config, items):
    if HAS_GPU:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def emulated_build(tmp_path_factory):
    """torch.ops.preact_fused_emu: csrc/ built with the host compiler against csrc/emulate/."""
    if not os.path.isdir(os.path.join(CSRC, "emulate")):
        pytest.skip("csrc/ is not beside the tests")
    if shutil.which("c++") is None:
        pytest.skip("no host C++ compiler")
    from torch.utils.cpp_extension import load
    from preact_fused import contract
    load(name="preact_fused_emu",
         sources=[os.path.join(CSRC, "bindings.cpp"), os.path.join(CSRC, "emulate", "kernels.cpp")],
         extra_include_paths=[os.path.join(CSRC, "emulate"), CSRC],
         extra_cflags=["-DPF_EMULATE", "-O1", "-ffp-contract=off"],
         build_directory=str(tmp_path_factory.mktemp("emulated_build")), is_python_module=False, with_cuda=False)
    contract.register_fakes("preact_fused_emu")
    return torch.ops.preact_fused_emu


@pytest.fixture
def emu(emulated_build, monkeypatch):
    """preact_fused.cuda's wrappers running the emulated kernels on CPU tensors."""
    monkeypatch.setattr(cuda_backend, "_ops", lambda: emulated_build)
    return cuda_backend


@pytest.fixture(params=backends.BACKENDS, ids=lambda name: f"{name}_backend")
def fused_backend(request):
    """A backend name the fused modules can run on DEVICE; without a GPU, "cuda" runs the emulated
    kernels on CPU tensors (``emu``, and the backend reported available on the CPU)."""
    name = request.param
    if name == "cuda" and not HAS_GPU:
        request.getfixturevalue("emu")
        request.getfixturevalue("monkeypatch").setattr(cuda_backend, "unavailable_reason", lambda device: None)
    backends.reset()  # the resolved backends depend on what the fixture patched
    request.addfinalizer(backends.reset)
    reason = backends.unavailable_reason(name, torch.device(DEVICE))
    if reason is not None:
        pytest.skip(f"backend {name!r} unavailable: {reason}")
    return name

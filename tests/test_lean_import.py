"""Importing fisherlora (and its compiled backend) must not initialise CUDA.

Runs in a fresh interpreter, where torch's CUDA initialisation entry points are replaced by
tripwires first: on a CPU machine ``torch.cuda.is_initialized()`` is always false, so the
tripwires are what make the test meaningful there.
"""

import subprocess
import sys
import textwrap

_SCRIPT = textwrap.dedent(
    """
    import torch
    import torch.cuda

    def tripwire(*args, **kwargs):
        raise AssertionError("CUDA was initialised during import")

    torch.cuda._lazy_init = tripwire
    torch.cuda.init = tripwire

    import fisherlora
    import fisherlora.ops
    from fisherlora.ops import dispatch

    dispatch.available_backends("cpu")  # loads the compiled backend, if built
    x = torch.randn(5, 3)
    fisherlora.ops.syrk_accumulate_(torch.zeros(3, 3), x)  # backend="auto" on CPU
    assert not torch.cuda.is_initialized(), "CUDA context created"
    print("lean", dispatch.load_error("ext"))
    """
)


def test_import_does_not_initialise_cuda():
    proc = subprocess.run([sys.executable, "-c", _SCRIPT], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("lean"), proc.stdout

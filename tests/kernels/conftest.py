"""Kernel tests run the Triton kernels on CPU through triton's interpreter.

TRITON_INTERPRET=1 must be set before triton is first imported (triton decides compile vs
interpret at import); kiln.kernels imports triton lazily, so setting it here is early enough
unless another test module imported triton first (then set it in tests/conftest.py too).
"""
import os

os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

from kiln.kernels import dispatch  # noqa: E402


@pytest.fixture(autouse=True)
def _restore_dispatch():
    """Each test may switch kernels.use; put the global choice back afterwards."""
    saved = dict(dispatch._STATE)
    yield
    dispatch._STATE.update(saved)


@pytest.fixture
def interp():
    """Fail clearly when triton cannot interpret (imported before TRITON_INTERPRET=1 was set)."""
    from kiln.kernels.triton_util import interpreting
    if not interpreting():
        pytest.fail("triton was imported before TRITON_INTERPRET=1 was set; set it in "
                    "tests/conftest.py so the Triton kernels can run on CPU")

"""GPTQ's column loop runs hundreds of tiny (N,)-sized ops; on a shared CPU, intra-op threads
only add contention to them (measured: 0.02 s per 64x256 call on one thread, 0.4 s on two
threads of a loaded 2-core machine), so these tests run on one thread."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

"""Model tests run single-threaded: their tensors are tiny, so intra-op threads only add overhead
(3-4x on a shared machine); this also keeps the folder's timing honest for "one core"."""
import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

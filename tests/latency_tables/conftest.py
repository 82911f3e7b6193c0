"""Fixtures for the latency-table tests."""
import pytest

from lat_helpers import TINY, fake_table
from latency_tables.segments import space_keys
from supernet.space import load_space


@pytest.fixture(scope="session")
def tiny_space():
    return load_space(TINY)


@pytest.fixture(scope="session")
def tiny_keys(tiny_space):
    return space_keys(tiny_space)


@pytest.fixture
def tiny_table(tiny_keys):
    return fake_table(tiny_keys)



@pytest.fixture(autouse=True)
def one_thread():
    # small tensors: a second intra-op thread only costs (and spins badly on a busy 2-core machine)
    import torch
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)

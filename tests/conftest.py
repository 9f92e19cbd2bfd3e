import zlib

import numpy as np
import pytest

from tvm_scalpel.targets import resolve_target


@pytest.fixture
def rng(request) -> np.random.Generator:
    """A generator seeded from the test's id: every test draws its own, reproducible, inputs."""
    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture(scope="session")
def host():
    """The host CPU's target profile ('x86')."""
    return resolve_target("x86")


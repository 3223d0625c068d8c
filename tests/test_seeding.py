"""The suite's random state (conftest ``seeded``): each test starts its global generators from a state
fixed by its own name, whatever ran before it in the same worker."""
import os
import random
import zlib

import numpy as np
import torch


def _expected_seed(request):
    shift = 7919 * int(os.environ.get("MMEA_TEST_SEED", "0"))
    return (zlib.crc32(request.node.nodeid.encode()) + shift) % 2**32


def test_a_test_draws_from_the_state_its_name_fixes(request):
    seed = _expected_seed(request)
    got = (torch.rand(3), np.random.rand(3), random.random())
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)
    assert torch.equal(got[0], torch.rand(3))
    np.testing.assert_array_equal(got[1], np.random.rand(3))
    assert got[2] == random.random()


def test_another_test_draws_something_else(request):
    first = torch.rand(3)
    torch.manual_seed(_expected_seed(request))
    assert torch.equal(first, torch.rand(3))
    torch.manual_seed(_expected_seed(request) + 1)  # whatever this test leaves behind ...
    torch.rand(5)


def test_what_an_earlier_test_left_does_not_reach_the_next(request):
    # ... is not what this one starts from (the tests in one file run in order in one worker)
    first = torch.rand(3)
    torch.manual_seed(_expected_seed(request))
    assert torch.equal(first, torch.rand(3))

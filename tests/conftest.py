import os

import pytest
import torch

# CI has 2 cores; keep torch from oversubscribing when pytest runs alongside subprocesses
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)

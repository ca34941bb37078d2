"""Suite-wide test settings.

Under pytest-xdist every worker is its own process on its own core: one intra-op thread each keeps the
workers from fighting over the cores (tiny models gain nothing from more).
"""

import os

import torch

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)

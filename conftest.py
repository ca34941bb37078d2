"""Suite-wide test settings.

One intra-op thread in every test process: the models are tiny and gain nothing from more threads,
while on a 2-core machine two threads whose partner is descheduled (another pytest-xdist worker, or any
other process) make every operation wait. Measured on papers/d3po under load 3-5: 3-5x slower with two
threads. `ALIGNZOO_TEST_THREADS=N` overrides it.
"""

import os

import torch

torch.set_num_threads(int(os.environ.get("ALIGNZOO_TEST_THREADS", "1")))

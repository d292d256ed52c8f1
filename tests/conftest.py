import os

import torch

# The machine running the suite has 2 cores; keep torch from oversubscribing them.
torch.set_num_threads(int(os.environ.get("SBI_GEN_TEST_THREADS", "2")))

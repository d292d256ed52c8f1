import os

import torch

# The suite runs on 2 cores, with subprocess tests beside it; the networks in the tests are
# small, where one thread is faster than two competing ones.
torch.set_num_threads(int(os.environ.get("SBI_GEN_TEST_THREADS", "1")))

import os

import torch

# The suite runs on 2-core machines next to other work; one intra-op thread per test process is
# faster there than oversubscribed pools (the models under test are tiny).
torch.set_num_threads(1)
# The CLI (called in-process by many tests) would otherwise switch to one thread per core.
os.environ.setdefault("FEDMM_THREADS", "1")

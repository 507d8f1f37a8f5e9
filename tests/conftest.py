import os
import sys

# tests import the tiny-model factory as a plain module
sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402

# Tiny models run far faster on one thread (and the machine is 2 cores); real-model tests set their own.
torch.set_num_threads(1)

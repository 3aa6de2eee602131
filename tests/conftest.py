"""Shared test settings: one intra-op thread (tiny tensors; avoids oversubscription on a 2-core CI box)."""

import torch

torch.set_num_threads(1)

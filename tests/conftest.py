"""Test-wide settings: the models here are tiny, where one torch thread is fastest and immune to a
busy machine (two threads on a loaded 2-core box slow tiny ops down many times)."""

import sys
from pathlib import Path

import torch

torch.set_num_threads(1)
sys.path.insert(0, str(Path(__file__).parent))  # tests import their shared helpers (toy.py) by name

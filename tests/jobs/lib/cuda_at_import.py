"""A library that initialises CUDA when imported (some do, to query devices), simulated on a
host without CUDA: it leaves torch in the state its own lazy CUDA init leaves (torch.cuda.
is_initialized() is true), which is what makes a process unsafe to fork ranks from."""

import torch

torch.cuda._initialized = True  # what torch.cuda._lazy_init sets once a context exists

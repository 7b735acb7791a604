"""kodkod.core.sampling: the ordered sampling stages and the numpy kernels of those llama.cpp lacks."""

"""distvgg: the PyTorch quick guide's VGG3Layer and training loop, as a package that trains on
one CPU, one GPU, many GPUs or many machines with `accelerate launch -m distvgg.train`."""

__version__ = "0.1.0"

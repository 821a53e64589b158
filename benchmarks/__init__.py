"""Benchmarks of rpn_ops against torchvision and the plain-PyTorch reference (see README.md)."""

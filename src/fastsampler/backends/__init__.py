"""The backends: the numpy reference, the C++ CPU extension and the Triton kernels, behind one `Backend` protocol."""

"""Triton kernels, installed as ``fastseg.kernels``; each module holds one op's kernels and the
Python launchers that the op's ``triton`` backend calls. Imported lazily: triton is optional."""

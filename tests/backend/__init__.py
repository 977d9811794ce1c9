"""Tests of `packcollate.backend`: the attention backend, its kernels and mask, the restarted layers."""

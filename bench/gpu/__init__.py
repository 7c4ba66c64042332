"""The one-call GPU check's parts (bench/gpu_check.py runs them): install, kernels, speed, train, sp."""

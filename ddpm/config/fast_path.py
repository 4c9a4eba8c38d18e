"""The fast path's named choices (``ddpm.acceleration`` says what each does)."""

PRECISIONS = ("auto", "fp32", "tf32", "bf16")
# what a network's own forward can run in (``network``): tf32 is process-wide (``set_matmul_precision``)
NETWORK_PRECISIONS = tuple(p for p in PRECISIONS if p != "tf32")
MEMORY_FORMATS = ("auto", "contiguous", "channels_last")
COMPILE_MODES = ("auto", "none", "default", "reduce-overhead", "max-autotune", "cudagraphs", "step-graph")

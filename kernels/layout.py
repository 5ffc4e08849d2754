"""The byte layout of quantized weights: the constants the format (:mod:`.qweight`) and the
kernels that read it (:mod:`.simd`, :mod:`.cpu_numba`) share. Plain Python, no imports, so the
format and the kernels depend on it and not on each other."""

GROUP = 32  # weights per quantization group (one scale each)
SUPER = 8  # int4: groups per super-block (256 weights)
META = 20  # int4: bytes of a super-block's scales: fp16 d, fp16 dmin, 8 sub-scales, 8 sub-minimums
# int4: a super-block's d and dmin are stored as fp16 of the value times SUPER_SCALE, which keeps
# realistic scales (1e-6 .. 1) in fp16's normal range and fp16 inputs (GGUF Q4_K) exact
SUPER_SCALE = 4096.0

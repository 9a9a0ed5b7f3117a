"""The method's math, arrays in and arrays out (no files, no torch, no option objects): H
preparation (`hessian`), the DAQ block solver (`daq`), one group (`group`), ABMP's allocators
(`abmp`), refinement (`refine`), the input rotation (`rotation`), quadratic forms (`forms`),
the baselines (`baselines`), MCS masking (`mcs`) and the packed matmul kernels (`bcq_matmul`,
`bcq_matmul_cuda`, `simd`). docs/METHOD.md describes what each computes."""

"""vmckpt.lab: the lab side of vmckpt, beside the benchmarks: the experiments behind
`vmckpt bench` and the synthetic guest the tests and benchmarks run. It uses the engine and the
store; neither imports it."""

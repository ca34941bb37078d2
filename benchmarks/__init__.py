"""Performance measurements: update overhead, step kernels, real-shape GPU throughput, suite time.

`python -m benchmarks.harness`, `python -m benchmarks.kernels` and `python -m benchmarks.suite_time` each
write a JSON file under `benchmarks/results/`; `python -m benchmarks.report` turns the newest files into
`docs/performance.md`. `nox -s bench` runs the CPU ones and the report. `benchmarks.gpu_real_shapes`
runs on one GPU only.
"""

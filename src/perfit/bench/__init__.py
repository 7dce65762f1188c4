"""The lab: speed benchmarks (CPU and GPU), the scale benchmark, the paper's experiment grid, the
learning-rate tuning, results, report and figures. Only the CLI and benchmarks/ import it."""

"""Speed and memory benchmarks: python -m bench.speed (docs/speed.md, docs/speed-gpu.md) and the GPU scripts beside it."""

"""Speed and memory benchmarks, run as ``python -m bench.<name>``; results in bench/RESULTS.md."""

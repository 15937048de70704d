"""`python -m runtime.bench_one_batch`, the name SGLang users type; the benchmark is runtime/bench/one_batch.py."""

from runtime.bench.one_batch import main

if __name__ == "__main__":
    main()

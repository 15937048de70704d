"""`python -m runtime.bench_serving`, the name SGLang users type; the benchmark lives in runtime/bench/serving.py."""

from runtime.bench.serving import main

if __name__ == "__main__":
    main()

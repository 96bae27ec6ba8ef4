"""Load generation and measurement: `moe-serve bench` and `moe-serve loadtest`.

| module        | what                                                                  |
|---------------|-----------------------------------------------------------------------|
| `arrivals.py` | when requests arrive: fixed concurrency, Poisson, gamma, rate profiles |
| `driver.py`   | the async gRPC driver (loopback only): one `RequestResult` per request |
| `stats.py`    | percentiles, throughput, goodput under an SLO; machine + command info  |
| `scrape.py`   | a tolerant Prometheus text parser for the cluster's metrics endpoint   |
| `bench.py`    | `moe-serve bench` (gRPC target, or the engine in-process)              |
| `loadtest.py` | `moe-serve loadtest` (spike / ramp / diurnal / poisson, timeline, plot)|

The lead wires `add_bench_arguments` / `run_bench` and `add_loadtest_arguments` /
`run_loadtest` into serving/cli.py; modules are imported lazily so the CLI stays fast.
"""
from __future__ import annotations

__all__ = ["add_bench_arguments", "run_bench", "add_loadtest_arguments", "run_loadtest"]


def add_bench_arguments(parser):  # noqa: ANN001, ANN201 - thin lazy re-exports
    from serving.loadgen.bench import add_bench_arguments as f
    return f(parser)


def run_bench(args):  # noqa: ANN001, ANN201
    from serving.loadgen.bench import run_bench as f
    return f(args)


def add_loadtest_arguments(parser):  # noqa: ANN001, ANN201
    from serving.loadgen.loadtest import add_loadtest_arguments as f
    return f(parser)


def run_loadtest(args):  # noqa: ANN001, ANN201
    from serving.loadgen.loadtest import run_loadtest as f
    return f(args)

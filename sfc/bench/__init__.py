"""`python -m sfc.bench`: training-step benchmark of the five stage kinds (issue 6).

* `steps`: the real `sfc.stages` stages on synthetic batches, stepped as `sfc.engine` does;
* `measure`: timing, memory, FLOP counting, the full-pipeline extrapolation (SPEC §5);
* `run`: one stage's measurement, and the release-style reference (`sfc.bench_reference`) in
  lockstep with the project's step;
* `loaders`: data-loader throughput on native-size synthetic files;
* `report`: the readable tables. Results: docs/benchmark.md.
"""

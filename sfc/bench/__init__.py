"""`python -m sfc.bench`: training-step benchmark of the five stage kinds (issue 6).

* `cli`: the command line (`python -m sfc.bench`, `sfc-bench`);
* `steps`: the real `sfc.train.stages` stages on synthetic batches, stepped as the engine does;
* `measure`: timing, memory, FLOP counting, the full-pipeline extrapolation (method §5);
* `reference`: the release-style SFC stage-one and SFM steps (one SFM call per class, frozen
  nets under autograd) that the project's steps are compared with;
* `run`: one stage's measurement, and the release-style reference (`sfc.bench.reference`) in
  lockstep with the project's step;
* `loaders`: data-loader throughput on native-size synthetic files;
* `report`: the readable tables. Results: docs/benchmark.md.
"""

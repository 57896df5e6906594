"""The names of the training metrics an ML engineer opens a run for.

MLflow's run page ("Model metrics") groups charts into sections by the name's prefix
before "/" and sorts the sections by code point, upper case before lower case ("Eval" <
"Loss" < "Throughput" < "data" < "memory" < "pipeline"; names without "/" come last).
Capitalised prefixes put task scores (when the run has any), the loss and throughput
first. Workers, the console, the plots, `raytron runs`/`status` and the benchmarks read
the names from here.
"""

TRAIN_LOSS = "Loss/train"
VAL_LOSS = "Loss/val"
VAL_PERPLEXITY = "Loss/val_perplexity"
EVAL_TASKS = "Eval"  # Eval/<task>/<metric>: train.eval_tasks' lm-evaluation-harness scores
TOKENS_PER_S = "Throughput/tokens_per_s"
MFU = "Throughput/mfu"
STEP_TIME_S = "Throughput/step_time_s"
INPUT_WAIT_S = "Throughput/input_wait_s"
SNAPSHOT_S = "Throughput/snapshot_s"  # the time in-memory snapshots held the step up
REPLICAS = "Throughput/replicas"  # replica mode: how many replicas computed the step
PEAK_MEMORY_GB = "memory/peak_gb"  # the busiest rank's; memory/peak_gb_pp<N> per pipeline rank
RESERVED_MEMORY_GB = "memory/reserved_gb"  # on GPUs: the allocator's peak reservation

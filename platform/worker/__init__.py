"""The per-rank side (one Ray actor per device): the training loop, the trainer's step
math, the mesh layout, the optimizer, the watchdog and fault drills."""

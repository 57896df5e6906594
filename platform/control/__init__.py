"""The controller side (the driver process): settling a run, its actors, supervising its
worker groups through Ray Train, elastic sizing, the console and `raytron status`."""

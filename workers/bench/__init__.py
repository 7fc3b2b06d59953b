"""GPU measurements of the model's decode step (they need the runner and the engine, so they live beside
them, not with the kernels): `python -m mlapipe.workers.bench.decode_step`, `... .profile_decode`."""

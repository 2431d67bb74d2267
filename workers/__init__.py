"""The data plane: one worker process per request virtqueue (installed as ``vscsid.workers``)."""

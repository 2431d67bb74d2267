"""The virtio layer both processes share (the supervisor and the workers): ring
and feature definitions, guest memory, the split ring, the inflight region and
the virtio-scsi wire format, with their C helpers (virtio.h, fences.h, ring.c).
It imports nothing else of vscsid."""

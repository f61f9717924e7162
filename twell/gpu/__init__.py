"""GPU orchestration of the FFN ops, one module per job: :mod:`.inference` (decode, small batches, the
sparse path with its dense backup rows, the dense path), :mod:`.training` (the hybrid forward and the
backward, sparse or dense), :mod:`.streams` (CUDA-graph capture and allocations).  Arguments are
validated by :mod:`twell.ops` before they get here."""

"""Checkpoint writers: plain files (.safetensors, torch .pt) streamed from TensorRefs.

They sit beside ``formats/`` (the readers) and ``store/`` (which exports
snapshots with them) and import neither, so neither of those imports the
other. Each writer takes tensors and a ``chunks(ref)`` source and writes
bytes chunk by chunk: memory stays flat whatever the model size. Choosing
a temp file and renaming it into place is the caller's business.
"""

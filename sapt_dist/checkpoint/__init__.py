"""What a run folder keeps: atomic writes, block files, resumable run state."""

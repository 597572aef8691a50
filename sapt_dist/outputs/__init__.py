"""What a run gives: metrics, reports, tracking, studies across runs, predictions."""

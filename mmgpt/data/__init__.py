"""Files -> records -> tokens + pixels -> batches."""

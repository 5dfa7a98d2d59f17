"""Page groups: runs (/ and /runs/{id}), layers (feature tables), features (one feature)."""

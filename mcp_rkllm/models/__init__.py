"""Model store: roots, discovery, name resolution, sidecar defaults (see `store`)."""

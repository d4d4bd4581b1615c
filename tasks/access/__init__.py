"""Who may do what: API keys, ownership of files and batches, per-key quotas."""

"""Process groups and launch environment, token dispatchers, two-batch overlap."""

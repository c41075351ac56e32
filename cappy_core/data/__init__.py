"""BIG-Bench offline: the source archive cache, the task.json loader and the Parquet records."""

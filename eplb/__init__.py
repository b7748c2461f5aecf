"""Expert-placement load balancing: load recording, placement algorithm, placement maps, migration, CLI."""

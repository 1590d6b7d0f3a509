"""pals simulator and shared core: scenario schema, catalog, physics, engine, controllers, metrics, reports, CLI."""

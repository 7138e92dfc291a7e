"""Sources of apps: fetching, unpacking, caching, Procfile and .env parsing, builds."""

"""geocache's click front end, installed as ``geocache_cli``. It only parses and calls the library."""

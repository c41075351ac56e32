"""The load test's phases, one module each (``fault`` and ``generator_kill``, two replica kills,
share :mod:`.kills`); each takes the config, the app's URL and its request bodies and returns
its figures for the JSON line."""

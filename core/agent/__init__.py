"""The meta-controller and what it keeps per conversation: routing, moods, the SQLite store,
and the registry of live conversations. Depends on the persona, scene and engine layers."""

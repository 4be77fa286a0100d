"""The operations console at /admin: its JSON API (routes, protocol), what it reads and changes (console) and its
monitoring graphs (history)."""

"""Scripts the tests start as separate processes (through tests/procs.py's PeerProcess or the launcher)."""

"""RPC-backed models in a supervised engine child process (`ChildBackend`, `child.py`)."""

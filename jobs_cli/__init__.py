"""`jobs`: the command line for the jobs HTTP API (submit, watch, inspect, retry, cancel).

The standard library and sseclient-py (a one-module parser of server-sent events), so it
runs wherever Python 3.11 does. Exit codes: 0 ok, 1 the job failed or the API refused the
request, 2 usage error, 3 the API cannot be reached.
"""

__version__ = "0.1.0"

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3
EXIT_INTERRUPTED = 130

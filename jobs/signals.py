"""Signals that end a bus session's hold on its jobs, declared here where they are received.

The bus sends them (bus/store.py) and jobs receives them (JobsConfig.ready
connects jobs.receivers), so `jobs` never imports `bus`. Each is sent with
`session` (a UUID) and `reason` (text for the audit trail); the sender is the
Bus object. They are sent with `send`, not `send_robust`, so a database error
reaches the bus, which keeps the reset pending and retries.
"""

from django.dispatch import Signal

session_lost = Signal()  # EOF, socket error, framing error, bye, shutdown
heartbeat_timeout = Signal()  # nothing heard for 2 x HEARTBEAT_TIMEOUT
supervisor_lost = Signal()  # SUPERVISED and the parent process went away

"""Bus sessions are declared in jobs.models (table `bus_bussession`), so pages read them without importing bus.

The bus writes them; these names stay importable from here for the bus side.
"""

from jobs.models import BusSession, BusSessionQuerySet, SessionState

__all__ = ["BusSession", "BusSessionQuerySet", "SessionState"]

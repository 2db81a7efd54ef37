"""Crawler endpoints, for the bus and the crawler: defined in jobsite/endpoints.py (Django-free).

They live there because settings parse them at start-up and settings import no
app; this module keeps `bus.endpoints` the name the bus side imports.
"""

from jobsite.endpoints import Endpoint, EndpointError, parse_endpoint, parse_endpoints

__all__ = ["Endpoint", "EndpointError", "parse_endpoint", "parse_endpoints"]

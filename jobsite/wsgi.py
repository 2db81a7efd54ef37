"""WSGI entry point; the bus thread starts from BusConfig.ready in the worker."""

import os

from django.core.wsgi import get_wsgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "jobsite.settings")
application = get_wsgi_application()

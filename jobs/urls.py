"""URLs of the web pages, /health and the read-only JSON API."""

from django.urls import path

from . import api, views

app_name = "jobs"

urlpatterns = [
    path("", views.dashboard, name="dashboard"),
    path("jobs/", views.job_list, name="list"),
    path("jobs/new", views.enqueue, name="new"),
    path("jobs/actions", views.job_actions, name="actions"),
    path("jobs/<int:job_id>/", views.job_detail, name="detail"),
    path("health", views.health, name="health"),
    path("api/jobs/", api.job_list, name="api_list"),
    path("api/jobs/<int:job_id>/", api.job_detail, name="api_detail"),
]

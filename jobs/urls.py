"""URLs of the web pages, /health, crawlers' announcements and the read-only JSON API."""

from django.urls import path

from . import api, views, views_items
from .views_hosts import host_detail, hosts

app_name = "jobs"

urlpatterns = [
    path("", views.dashboard, name="dashboard"),
    path("jobs/", views.job_list, name="list"),
    path("jobs/new", views.enqueue, name="new"),
    path("jobs/actions", views.job_actions, name="actions"),
    path("jobs/<int:job_id>/", views.job_detail, name="detail"),
    path("jobs/<int:job_id>/items.jsonl", views_items.job_items, name="items"),
    path("crawlers/", views.crawlers, name="crawlers"),
    path("crawlers/add", views.crawler_add, name="crawler_add"),
    path("crawlers/action", views.crawler_action, name="crawler_action"),
    path("crawlers/remove", views.crawler_remove, name="crawler_remove"),
    path("crawlers/announce", views.announce, name="announce"),
    path("hosts/", hosts, name="hosts"),
    path("hosts/<str:key>/", host_detail, name="host"),
    path("health", views.health, name="health"),
    path("api/jobs/", api.jobs, name="api_list"),
    path("api/jobs/<int:job_id>/", api.job_detail, name="api_detail"),
    path("api/jobs/<int:job_id>/items.jsonl", views_items.api_job_items, name="api_items"),
]

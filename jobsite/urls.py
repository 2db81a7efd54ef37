from django.contrib import admin
from django.contrib.auth import views as auth_views
from django.urls import include, path

urlpatterns = [
    path("admin/", admin.site.urls),
    # After signing in or out without a ?next=, land on the dashboard or the login page.
    path("accounts/login/", auth_views.LoginView.as_view(next_page="jobs:dashboard"), name="login"),
    path("accounts/logout/", auth_views.LogoutView.as_view(next_page="login"), name="logout"),
    path("accounts/", include("django.contrib.auth.urls")),
    path("", include("jobs.urls")),
]

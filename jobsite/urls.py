"""The project's URLs: the admin, sign-in, and the jobs pages.

Password reset mails a link, so its pages exist only when mail is configured
(EMAIL_URL); without it no reset URL exists and no page links to one.
"""

from django.conf import settings
from django.contrib import admin
from django.contrib.auth import views as auth_views
from django.urls import include, path

urlpatterns = [
    path("admin/", admin.site.urls),
    # After signing in or out without a ?next=, land on the dashboard or the login page.
    path("accounts/login/", auth_views.LoginView.as_view(next_page="jobs:dashboard"), name="login"),
    path("accounts/logout/", auth_views.LogoutView.as_view(next_page="login"), name="logout"),
    path("accounts/password_change/", auth_views.PasswordChangeView.as_view(), name="password_change"),
    path("accounts/password_change/done/", auth_views.PasswordChangeDoneView.as_view(), name="password_change_done"),
]
if settings.PASSWORD_RESET_ENABLED:
    urlpatterns += [
        path("accounts/password_reset/", auth_views.PasswordResetView.as_view(), name="password_reset"),
        path("accounts/password_reset/done/", auth_views.PasswordResetDoneView.as_view(), name="password_reset_done"),
        path(
            "accounts/reset/<uidb64>/<token>/",
            auth_views.PasswordResetConfirmView.as_view(),
            name="password_reset_confirm",
        ),
        path("accounts/reset/done/", auth_views.PasswordResetCompleteView.as_view(), name="password_reset_complete"),
    ]
    # The admin's sign-in page shows "Forgotten your password?" when this name exists
    # (first: the admin's own URLs would answer 404 for it).
    urlpatterns.insert(
        0, path("admin/password_reset/", auth_views.PasswordResetView.as_view(), name="admin_password_reset")
    )
urlpatterns += [path("", include("jobs.urls"))]

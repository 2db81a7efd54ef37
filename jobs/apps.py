from django.apps import AppConfig


class JobsConfig(AppConfig):
    name = "jobs"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from . import receivers, signals

        signals.session_lost.connect(receivers.requeue_session_jobs, dispatch_uid="jobs.session_lost")
        signals.heartbeat_timeout.connect(receivers.requeue_session_jobs, dispatch_uid="jobs.heartbeat_timeout")
        signals.supervisor_lost.connect(receivers.requeue_session_jobs, dispatch_uid="jobs.supervisor_lost")

"""BusSession moves from the bus app to jobs, keeping its table `bus_bussession`.

State only: the table, its indexes and its rows stay as they are. It depends on
bus 0001 because that migration creates the table (on a fresh database too),
and bus 0002 removes the model from the bus app's state after this one. The
content type is renamed so that permissions already granted on bus sessions
carry over.
"""

from django.db import migrations, models


def move_content_type(apps, schema_editor, *, old_app: str, new_app: str) -> None:
    ContentType = apps.get_model("contenttypes", "ContentType")
    db = schema_editor.connection.alias
    if not ContentType.objects.using(db).filter(app_label=new_app, model="bussession").exists():
        ContentType.objects.using(db).filter(app_label=old_app, model="bussession").update(app_label=new_app)


def forwards(apps, schema_editor):
    move_content_type(apps, schema_editor, old_app="bus", new_app="jobs")


def backwards(apps, schema_editor):
    move_content_type(apps, schema_editor, old_app="jobs", new_app="bus")


class Migration(migrations.Migration):
    dependencies = [
        ("jobs", "0003_job_crawler_run_alone"),
        ("bus", "0001_initial"),
        ("contenttypes", "0002_remove_content_type_name"),
    ]

    operations = [
        migrations.SeparateDatabaseAndState(
            state_operations=[
                migrations.CreateModel(
                    name="BusSession",
                    fields=[
                        ("session", models.UUIDField(primary_key=True, serialize=False)),
                        (
                            "node",
                            models.CharField(
                                help_text="The bus node id (host:pid unless BUS_NODE is set).", max_length=200
                            ),
                        ),
                        ("endpoint", models.CharField(max_length=500)),
                        ("crawler", models.CharField(blank=True, default="", max_length=200)),
                        (
                            "state",
                            models.CharField(
                                choices=[("connected", "Connected"), ("closed", "Closed"), ("lost", "Lost")],
                                default="connected",
                                max_length=16,
                            ),
                        ),
                        ("slots", models.PositiveIntegerField(default=0)),
                        ("connected_at", models.DateTimeField()),
                        ("last_heartbeat_at", models.DateTimeField(blank=True, null=True)),
                        ("closed_at", models.DateTimeField(blank=True, null=True)),
                        ("close_reason", models.TextField(blank=True, default="")),
                    ],
                    options={
                        "db_table": "bus_bussession",
                        "ordering": ["-connected_at"],
                        "indexes": [
                            models.Index(fields=["state", "-connected_at"], name="bussession_state"),
                            models.Index(fields=["node", "state"], name="bussession_node"),
                        ],
                    },
                ),
            ],
            database_operations=[],
        ),
        migrations.RunPython(forwards, backwards, elidable=True),
    ]

"""BusSession now belongs to the jobs app (jobs 0004): remove it from bus's state, keep the table."""

from django.db import migrations


class Migration(migrations.Migration):
    dependencies = [
        ("bus", "0001_initial"),
        ("jobs", "0004_bussession_state_move"),
    ]

    operations = [
        migrations.SeparateDatabaseAndState(
            state_operations=[migrations.DeleteModel(name="BusSession")],
            database_operations=[],
        ),
    ]

"""Forms of the web pages: they parse what a person typed; the services decide what is valid."""

from __future__ import annotations

from typing import Any

from django import forms

MAX_LINES = 10_000
MAX_BULK = 1_000
ACTIONS = {"requeue": "Requeue", "retry": "Retry", "cancel": "Cancel"}
CRAWLER_ACTIONS = {"drain": "Drain", "resume": "Resume", "remove": "Remove after draining", "remove_now": "Remove now"}
MAX_ID = 2**63 - 1


def parse_id(text: str) -> int | None:
    """A job id typed or passed in a query string, or None: ASCII digits only, within a bigint.

    str.isdigit() also accepts "²" and "٣", on which int() fails or which no
    one means as an id, and int() of a 5,000-digit text raises: both were 500s.
    """
    text = text.strip()
    if not (text.isascii() and text.isdigit()) or len(text) > len(str(MAX_ID)):
        return None
    value = int(text)
    return value if value <= MAX_ID else None


class EnqueueForm(forms.Form):
    urls = forms.CharField(
        label="URLs, one per line",
        widget=forms.Textarea(attrs={"rows": 10, "spellcheck": "false"}),
        help_text="Blank lines are skipped. Every line must be valid, or nothing is queued.",
    )
    priority = forms.IntegerField(initial=0, min_value=-(2**31), max_value=2**31 - 1, help_text="Higher runs first.")
    kind = forms.CharField(
        required=False,
        max_length=100,
        help_text="Only crawlers that take this kind run these jobs. Empty: any crawler.",
        widget=forms.TextInput(attrs={"spellcheck": "false", "autocomplete": "off"}),
    )

    def numbered_lines(self) -> list[tuple[int, str]]:
        """(line number in the textarea, text) of every non-blank line."""
        lines = self.cleaned_data["urls"].splitlines()
        return [(number, line.strip()) for number, line in enumerate(lines, start=1) if line.strip()]

    def clean_urls(self) -> str:
        text = self.cleaned_data["urls"]
        if len(text.splitlines()) > MAX_LINES:
            raise forms.ValidationError(f"at most {MAX_LINES} lines at once")
        return text


class BulkActionForm(forms.Form):
    """An action and the ids of the jobs it applies to (`job`, repeated)."""

    action = forms.ChoiceField(choices=list(ACTIONS.items()))
    next = forms.CharField(required=False)

    def clean(self) -> dict[str, Any]:
        super().clean()  # Form.clean returns self.cleaned_data (its stub says it may be None)
        cleaned = self.cleaned_data
        texts = self.data.getlist("job") if hasattr(self.data, "getlist") else []
        if not texts:
            raise forms.ValidationError("Select at least one job.")
        if len(texts) > MAX_BULK:
            raise forms.ValidationError(f"At most {MAX_BULK} jobs at once.")
        parsed = [parse_id(text) for text in texts]
        job_ids = [job_id for job_id in parsed if job_id is not None]
        if len(job_ids) < len(parsed):
            raise forms.ValidationError("Job ids are whole numbers.")
        # Any id is accepted: the services skip jobs that are not in a state the action applies to.
        cleaned["job_ids"] = sorted(set(job_ids))
        return cleaned


class CrawlerAddForm(forms.Form):
    """A crawler to register from the crawlers page; jobs.fleet checks and spells the endpoint."""

    endpoint = forms.CharField(
        max_length=1000,
        help_text="unix:/abs/path.sock (or /abs/path.sock), or tcp://host:port when BUS_TOKEN is set.",
        widget=forms.TextInput(attrs={"spellcheck": "false", "autocomplete": "off"}),
    )
    label = forms.CharField(max_length=200, required=False, help_text="A name for people (optional).")


class CrawlerActionForm(forms.Form):
    """One crawler action (CRAWLER_ACTIONS, run by jobs.actions.run_crawler_action) on one endpoint."""

    action = forms.ChoiceField(choices=list(CRAWLER_ACTIONS.items()))
    endpoint = forms.CharField(max_length=1000)

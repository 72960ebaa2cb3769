"""The `[notify]` table: who is told when a run ends, and on which endings.

    [notify]
    command = ["/usr/local/bin/page-oncall", "--team", "vision"]   # the summary JSON on its stdin
    webhook = "https://hooks.slack.com/services/..."               # a JSON summary with a Slack-style "text"
    on = ["failure", "stopped"]                                    # the default: never on a clean 0
    timeout_s = 10

The webhook URL is a secret like the API key: `secrets()` hands it, whole, to the job's redactor
(console, logs, errors, files). The command's arguments are not handed on: the answers pass
through that redactor, and an argument is often a plain word ("--team", "vision") that would be
rewritten in every answer holding it. Only the notify code ever sees them (its messages name the
program alone, and hide the arguments in what the program prints); this table's repr shows
neither.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import JobError
from .fields import Table, positive, setting

__all__ = ["NotifyConfig", "NOTIFY_ON"]

# How a run ended, by exit code (pipeline.engine.notify): success 0; failure 1, 2, 4 (failed rows,
# a bad manifest, a local failure); stopped 3, 130, 143 (the provider, a signal); waiting 5 (batches
# still running); locked 75 (the job was already running).
NOTIFY_ON = ("success", "failure", "stopped", "waiting", "locked")
MIN_SECRET = 4  # a shorter argument ("-v", "on") is no secret, and hiding it would garble the notify's messages


def _events(value: tuple[str, ...]) -> str | None:
    unknown = [v for v in value if v not in NOTIFY_ON]
    return f"unknown ending {unknown[0]!r}; choose from {', '.join(NOTIFY_ON)}" if unknown else None


def _webhook(value: str | None) -> str | None:
    if value is None or value.startswith(("http://", "https://")):
        return None
    return "must be an http:// or https:// URL"  # never the value: it is a secret


@dataclass(frozen=True)
class NotifyConfig(Table):
    TABLE = "notify"
    command: tuple[str, ...] = setting((), doc="a program and its arguments, run after a run ends with the summary "
                                               "JSON on stdin (no shell)")
    webhook: str | None = setting(None, check=_webhook,
                                  doc="a URL the summary is POSTed to as JSON, with a Slack-style \"text\" line")
    on: tuple[str, ...] = setting(("failure", "stopped"), check=_events,
                                  doc="the endings that notify: " + ", ".join(f'"{e}"' for e in NOTIFY_ON))
    timeout_s: float = setting(10.0, check=positive, doc="a notifier still running after this is cut off (a warning; "
                                                         "the run's exit code never changes)")

    def validate(self) -> None:
        if not self.command and self.webhook is None:
            raise JobError("[notify]: set command, webhook or both (or remove the table)")

    def secrets(self) -> list[str]:
        """What no output of the job may show: the webhook URL, whole (a part of it, such as a
        path "/hooks", could be an ordinary word of an answer)."""
        return [self.webhook] if self.webhook else []

    def own_secrets(self) -> list[str]:
        """What the notify code's own messages hide besides: the webhook URL and the arguments."""
        return [*self.secrets(), *(a for a in self.command[1:] if len(a) >= MIN_SECRET)]

    def __repr__(self) -> str:
        return f"NotifyConfig(command={self.command[:1]!r} + {len(self.command[1:])} arguments, " \
               f"webhook={'set' if self.webhook else None}, on={self.on!r}, timeout_s={self.timeout_s!r})"

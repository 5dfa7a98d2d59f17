"""What a task stops with. A leaf: every task's module imports it, and it imports nothing of theirs."""


class JobStopped(Exception):
    """Raised inside a task when it must stop: 'cancelled' or 'lease lost'."""


class JobFailed(Exception):
    """A failure the user can act on: its message is the job's error, as it stands."""

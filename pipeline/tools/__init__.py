"""What reads or rehearses without running a job: the built-in endpoint, the dry run, status."""

"""What operators read and run around a job: the dry run, the summary and
report files, ``status`` and ``export``, progress lines, and the logs."""

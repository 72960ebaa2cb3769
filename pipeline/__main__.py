import sys

try:
    from .cli import main

    sys.exit(main())
except KeyboardInterrupt:  # Ctrl-C before the run's own handler is installed (start-up, planning)
    print("interrupted before sending began; nothing was lost", file=sys.stderr)
    sys.exit(130)

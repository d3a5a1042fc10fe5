"""`python -m dragondiff ...` = the `dragondiff` command (for machines where it is not installed as a script)."""

from .cli import main

raise SystemExit(main())

"""``python -m data_prep``: same as the ``cmfl-data-prep`` console script."""

from data_prep import main

raise SystemExit(main())

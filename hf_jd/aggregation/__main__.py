"""``python -m hf_jd.aggregation [--write README.md | --check README.md]``: the README's aggregator tables."""

from ._tables import main

raise SystemExit(main())

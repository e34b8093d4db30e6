from myllm.cli import main

raise SystemExit(main())

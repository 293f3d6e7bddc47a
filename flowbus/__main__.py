from flowbus._cli import main

raise SystemExit(main())
